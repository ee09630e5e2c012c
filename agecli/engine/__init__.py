"""The training and inference machinery every stage shares: the loop, its optimiser and
schedule, metrics, timing and distributed helpers.

Imports the root helpers, `agecli.data` and `agecli.modeling`."""
