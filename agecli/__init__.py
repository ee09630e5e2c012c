"""agecli: turn face photos into fast, accurate age (and gender) estimators.

The pipeline is one module per stage, each usable from Python without the CLI:

    prepare  -> agecli.prepare.prepare(...)     faces detected, aligned, split, stored
    train    -> agecli.train.train(...)         a teacher (or any model) fine-tuned
    eval     -> agecli.evaluate.evaluate(...)   standard metrics for a checkpoint
    distill  -> agecli.distill.distill(...)     a small student taught by teacher(s)
    bench    -> agecli.bench.bench(...)         error, latency, robustness, in one table

Shared by all stages: `agecli.rundir` (run directories and manifests), `agecli.store`
(the face store), `agecli.checkpoint` (self-describing model files).
"""

__version__ = "0.1.0"

# A stage refuses artifacts written by a different *format* version (not package version):
# bump when the layout of a run directory, face store or checkpoint changes incompatibly.
FORMAT_VERSION = 1
