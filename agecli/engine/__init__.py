"""The training and inference machinery every stage shares:

    loop          fit: train_one_epoch, validate, precise BN; the input and loss functions it takes
    optim         optimiser, cosine schedule, TimeBudget (epochs_within a time limit)
    checkpointer  best.pt / last.pt / history, resume, extra state (a loss with learned parts)
    inference     predict_store: a model over store rows
    metrics       age_metrics, group_metrics, score
    timing        time_call, peak memory, FLOPs, machine info
    distributed   torchrun / DDP helpers

Imports the root helpers, `agecli.data` and `agecli.modeling`."""
