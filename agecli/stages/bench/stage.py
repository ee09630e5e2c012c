"""`bench(run)`: measure every model of a run, compare them, write RUN/bench/ and the report."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from agecli.device import require_device
from agecli.engine.timing import machine_info
from agecli.errors import AgecliError
from agecli.rundir import Stage, resolve_run, write_csv, write_json
from agecli.stages.bench.candidates import REFERENCE, Candidate, candidates, model_fingerprints
from agecli.stages.bench.measure import BACKENDS, BenchSetup, Measured, measure_checkpoint
from agecli.stages.bench.merge import (PreviousBench, check_same_settings, history, kept_models, merge, models_to_add,
                                       read_previous, settings)
from agecli.stages.bench.plots import write_plots
from agecli.stages.bench.reference import measure_reference
from agecli.stages.bench.robustness import robustness
from agecli.stages.bench.scoring import (ACCURACY_NOTES, AGREEMENT, accuracy_case, error_by_age, fill_agreement,
                                         speedups)

# the columns of results["table"] (the CLI's --json); bench.csv and bench.json keep every column
TABLE_COLUMNS = ["model", "role", "backend", "status", "input_size", "params_m", "gflops", "file_mb",
                 "mae", "cs5", "gender_acc", AGREEMENT, "test_seen", "latency_ms", "p95_ms", "throughput", "peak_mem_mb"]


def bench(run: str | os.PathLike | None = None, *, models: Sequence[str] | None = None, device: str | None = None,
          corruptions: bool | None = None, severities: Sequence[int] | None = None,
          corruption_names: Sequence[str] | None = None, corruption_limit: int | None = None,
          threads: int | None = None, batch_sizes: Sequence[int] | None = None,
          backends: Sequence[str] | None = None, include_reference: bool = True, warmup: int | None = None,
          repeats: int | None = None, seed: int | None = None, mirror: bool | None = None, add: bool = False,
          report: bool = True, progress=None) -> dict[str, Any]:
    """Benchmark the run's models (see `agecli.stages.bench`); writes RUN/bench/ and, unless
    `report=False`, RUN/report.md; returns the results (bench.json's content plus `report`,
    `table` and `measured_now`, the models this call measured). A setting left at None is
    its DEFAULT_SETTINGS value, or with `add` the finished bench's. `add`: measure only the
    models named (else those RUN/bench lacks) and keep the bench's other rows
    (`agecli.stages.bench.merge`). `mirror`: every model answers each face as the mean over it
    and its mirror image, scored and timed that way (`agecli.stages.bench.measure`)."""
    run = resolve_run(run)
    previous = read_previous(run) if add else None
    given = dict(device=device, corruptions=corruptions, severities=severities, corruption_names=corruption_names,
                 corruption_limit=corruption_limit, threads=threads, batch_sizes=batch_sizes, backends=backends,
                 warmup=warmup, repeats=repeats, seed=seed, mirror=mirror)
    s = settings(given, previous)
    device, corruptions, severities = s["device"], s["corruptions"], s["severities"]
    corruption_names, corruption_limit, seed = s["corruption_names"], s["corruption_limit"], s["seed"]
    backends, warmup, repeats = s["backends"], s["warmup"], s["repeats"]
    setup = _bench_setup(run, backends, device, s["threads"], s["batch_sizes"], warmup, repeats, s["mirror"])
    if corruptions and not setup.labelled:
        raise AgecliError(f"the test split of run {run} has no age labels (a `folder` run?), and --corruptions "
                          "measures the error against them; bench it without --corruptions (accuracy is then "
                          f"the agreement with the {REFERENCE} reference), or bench a labelled run.")
    args = dict(models=models, device=device, corruptions=corruptions, severities=list(severities),
                corruption_names=corruption_names, corruption_limit=corruption_limit, threads=setup.threads,
                batch_sizes=setup.batch_sizes, backends=list(backends), warmup=warmup, repeats=repeats, seed=seed,
                mirror=setup.mirror)
    if previous is not None:
        check_same_settings(previous, args, machine_info(device, setup.threads), len(setup.test_idx),
                            setup.store.fingerprint())
    cands, keep, inputs = _select(run, previous, models, include_reference, setup.labelled)
    if not cands:
        return _unchanged(run, previous, report)
    args.update(include_reference=any(c.role == "reference" for c in cands), add=bool(add))
    with Stage(run, "bench", args=args, inputs=inputs) as stage:
        measured = _measure_models(cands, setup, backends, progress)
        accuracy = accuracy_case(setup.labelled, measured.frames)
        if accuracy == "reference":
            fill_agreement(measured.rows, measured.frames)
        for row in measured.rows:
            row["measured"] = stage.manifest["started"]
        corr_frame, robust = None, {}
        if corruptions:
            corr_frame, robust = _add_robustness(setup, measured, severities, corruption_names, corruption_limit,
                                                 seed, progress)
        rows, by_age = measured.rows, error_by_age(measured.frames) if setup.labelled else None
        if previous is not None:
            rows, by_age, corr_frame, robust = merge(previous, keep, rows, by_age, corr_frame, robust)
        benches = history(previous, stage.manifest["started"], [c.name for c in cands])
        results = _write_results(stage, setup, rows, by_age, accuracy, corr_frame, robust, benches)
        _complete(stage, rows, len(keep) + len(cands), accuracy, setup.labelled)
    if report:
        from agecli.stages.report import write_report

        results["report"] = str(write_report(run))
    results["table"] = [{k: r.get(k) for k in TABLE_COLUMNS} for r in rows]
    results["measured_now"] = [c.name for c in cands]
    return results


def _select(run, previous: PreviousBench | None, models, include_reference: bool,
            labelled: bool) -> tuple[list[Candidate], list[str], dict[str, str]]:
    """(the models to measure, the finished bench's models kept beside them, the inputs the
    manifest records: every model of the table and its file's fingerprint)."""
    if previous is None:
        cands = candidates(run, models, include_reference)
        return cands, [], model_fingerprints(cands)
    cands = models_to_add(run, previous, models, include_reference, labelled)
    keep = kept_models(previous, [c.name for c in cands])
    kept_inputs = {k: v for k, v in previous.manifest.get("inputs", {}).items() if k in keep}
    return cands, keep, {**kept_inputs, **model_fingerprints(cands)}


def _bench_setup(run, backends, device, threads, batch_sizes, warmup, repeats, mirror=False) -> BenchSetup:
    """Check the options, set the thread count and open the run's test faces, in that order."""
    from agecli.store import FaceStore

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise AgecliError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}.")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise AgecliError(f"--device {device!r} is not supported; use cpu or cuda[:N].")
    require_device(device)   # a GPU torch sees, at an index the machine has
    if threads:
        torch.set_num_threads(int(threads))
    batch_sizes = sorted(set(int(b) for b in batch_sizes))
    if batch_sizes[0] < 1:
        raise AgecliError(f"--batch-sizes must be positive, got {batch_sizes}.")
    store = FaceStore.open(run)
    test_idx = store.indices("test")
    if len(test_idx) == 0:
        raise AgecliError(f"run {run} has no test split (records.csv has no rows with split == 'test'); "
                          "re-run `agecli prepare` with a test fraction, or bench a run that has one.")
    return BenchSetup(run=run, out_dir=run / "bench", store=store, test_idx=test_idx,
                      faces=_timing_faces(store, test_idx, batch_sizes[-1]), batch_sizes=batch_sizes,
                      device=device, threads=torch.get_num_threads(), warmup=warmup, repeats=repeats,
                      labelled=bool(store.records["age"].iloc[test_idx].notna().any()), mirror=bool(mirror))


def _timing_faces(store, test_idx: np.ndarray, big: int) -> torch.Tensor:
    """The same faces for every model: the first `big` test faces, repeated if there are fewer."""
    faces = torch.from_numpy(np.ascontiguousarray(store.images[np.sort(test_idx)[:big]]))
    if len(faces) < big:
        faces = faces[torch.arange(big) % len(faces)]
    return faces


def _measure_models(cands: list[Candidate], setup: BenchSetup, backends: Sequence[str], progress) -> Measured:
    measured = Measured()
    for k, cand in enumerate(cands):
        if progress:
            progress("bench models", k, len(cands))
        if cand.path is None:
            measure_reference(cand, setup, measured)
        else:
            measure_checkpoint(cand, setup, backends, measured)
    if progress:
        progress("bench models", len(cands), len(cands))
    return measured


def _add_robustness(setup: BenchSetup, measured: Measured, severities, names, limit, seed,
                    progress) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The corruption table and per-model summary; each model's rows get its mCE and mCE / clean MAE."""
    corr_frame, summaries = robustness(setup.store, setup.test_idx, measured.predictors, severities, names,
                                       limit, seed, progress)
    for row in measured.rows:
        summary = summaries.get(row["model"])
        if summary:
            row["mce"], row["mce_rel"] = summary["mce"], summary["mce_relative"]
    return corr_frame, summaries


def _write_results(stage: Stage, setup: BenchSetup, rows: list[dict[str, Any]], by_age: pd.DataFrame | None,
                   accuracy: str, corr_frame: pd.DataFrame | None, robust: dict[str, Any],
                   benches: list[dict[str, Any]]) -> dict[str, Any]:
    """bench.csv, error_by_age.csv, corruptions.csv, the plots and bench.json; returns bench.json's content."""
    device = setup.device
    table = pd.DataFrame(rows)
    write_csv(stage.path("bench.csv"), table)
    if by_age is not None:
        write_csv(stage.path("error_by_age.csv"), by_age)
    if corr_frame is not None:
        write_csv(stage.path("corruptions.csv"), corr_frame)
    machine = machine_info(device, setup.threads)
    mem_methods = sorted({r.get("mem_method") for r in rows if r.get("mem_method")})
    plots = write_plots(stage.dir, table, by_age, corr_frame, metric="mae" if setup.labelled else AGREEMENT)
    results = {
        "run": str(setup.run), "device": device, "threads": setup.threads, "machine": machine,
        "test_faces": int(len(setup.test_idx)), "data": setup.store.fingerprint(), "accuracy": accuracy,
        "accuracy_note": ACCURACY_NOTES[accuracy],
        "mirror": setup.mirror,
        "timing": {"warmup": setup.warmup, "repeats": setup.repeats, "batch_sizes": setup.batch_sizes,
                   "memory": mem_methods, "clock": "cuda events" if device.startswith("cuda") else "perf_counter"},
        "rows": rows, "speedups": speedups(rows), "robustness": robust, "plots": plots, "benches": benches,
    }
    write_json(stage.path("bench.json"), results)
    return results


def _unchanged(run, previous: PreviousBench, report: bool) -> dict[str, Any]:
    """What `add` returns when every model is benched already: the bench as it is, rewritten nowhere."""
    results = dict(previous.results)
    if report:
        from agecli.stages.report import write_report

        results["report"] = str(write_report(run))
    results["table"] = [{k: r.get(k) for k in TABLE_COLUMNS} for r in previous.rows]
    results["measured_now"] = []
    return results


def _complete(stage: Stage, rows: list[dict[str, Any]], models: int, accuracy: str, labelled: bool) -> None:
    metric = "mae" if labelled else AGREEMENT
    best = min((r[metric] for r in rows if r.get(metric) is not None), default=None)
    stage.complete(results={"models": models, "rows": len(rows), "accuracy": accuracy, f"best_{metric}": best})
