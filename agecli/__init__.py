"""agecli: turn face photos into fast, accurate age (and gender) estimators.

Every stage is a function usable from Python without the CLI:

    prepare  -> agecli.stages.prepare.prepare(...)    faces detected, aligned, split, stored
    train    -> agecli.stages.train.train(...)        a teacher (or any model) fine-tuned
    eval     -> agecli.stages.evaluate.evaluate(...)  standard metrics for a checkpoint
    distill  -> agecli.stages.distill.distill(...)    a small student taught by teacher(s)
    bench    -> agecli.stages.bench.bench(...)        error, latency, robustness, in one table
    export   -> agecli.stages.export.export(...)      ONNX / TorchScript with the model's spec
    predict  -> agecli.stages.predict.predict(...)    ages and genders of the faces in photos

and, for applications, `from agecli import AgeEstimator`: a model loaded once (by default the
one shipped with agecli, agecli/weights/) that takes images in memory or paths.

Layers, each importing only those above it: root helpers (errors, labels, progress,
options, device, rundir, store) -> data/ and modeling/ -> engine/ -> stages/ -> recipes/
-> cli/ (tests/test_layers.py keeps it so).
"""

__version__ = "0.1.0"

# A stage refuses artifacts written by a different *format* version (not package version):
# bump when the layout of a run directory, face store or checkpoint changes incompatibly.
FORMAT_VERSION = 1


def __getattr__(name: str):
    # `from agecli import AgeEstimator` without importing torch and the stages for `import agecli`
    if name == "AgeEstimator":
        from agecli.stages.estimator import AgeEstimator

        return AgeEstimator
    raise AttributeError(f"module 'agecli' has no attribute {name!r}")
