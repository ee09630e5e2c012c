"""One table row per model and backend: size, cost, latency, throughput and peak memory.

Backends: "eager" (PyTorch), "compile" (torch.compile; compilation time goes to `compile_s`
and is left out of the latency) and "onnxruntime" (exported with `agecli.stages.export`,
parity-checked). Latency is the median and p95 at the smallest batch, throughput comes from
the largest; every model is timed on the same faces (`BenchSetup.faces`). A backend that
fails is reported in its row, not raised.

`mirror`: every model answers each face as the mean over it and its mirror image (as
`predict --mirror`, `eval --mirror` and `--teacher-mirror` do): its error is scored that way
and each timed call runs both images of every face, so a batch of N faces is 2N images and
latency and throughput stay per face.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from agecli.engine.timing import count_flops, peak_memory, sync, time_call
from agecli.errors import AgecliError
from agecli.stages.bench.candidates import Candidate
from agecli.stages.bench.scoring import label_metrics

BACKENDS = ("eager", "compile", "onnxruntime")
DEFAULT_BACKENDS = ("eager", "onnxruntime")   # compile: on request (minutes to compile on CPU)
# how a bench measures, by default: rows measured with other settings do not compare (bench.merge)
DEFAULT_SETTINGS: dict[str, Any] = {
    "device": "cpu", "threads": None, "batch_sizes": (1, 32), "backends": DEFAULT_BACKENDS, "warmup": 10,
    "repeats": 50, "corruptions": False, "severities": (1, 2, 3, 4, 5), "corruption_names": None,
    "corruption_limit": 500, "seed": 0, "mirror": False}

# (store, indices) -> predicted ages: how the robustness check re-runs a model on corrupted faces
Predictor = Callable[[Any, np.ndarray], np.ndarray]


@dataclass
class BenchSetup:
    """What every model is measured with, the same for all of them."""

    run: Path
    out_dir: Path              # RUN/bench (exported ONNX files go to its onnx/)
    store: Any                 # the run's FaceStore
    test_idx: np.ndarray       # the test split: accuracy and agreement
    faces: torch.Tensor        # uint8 NHWC timing faces, as many as the largest batch
    batch_sizes: list[int]     # ascending: latency at the first, throughput at the last
    device: str
    threads: int
    warmup: int
    repeats: int
    labelled: bool             # the test faces have age labels
    mirror: bool = False       # each face answered with its mirror image too, averaged

    @property
    def small(self) -> int:
        return self.batch_sizes[0]

    @property
    def big(self) -> int:
        return self.batch_sizes[-1]


@dataclass
class Measured:
    """What measuring the models collects: table rows, each model's test predictions (for
    agreement and error by age) and its predictor (for the robustness check)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    predictors: dict[str, Predictor] = field(default_factory=dict)


# --------------------------------------------------------------------------- timing a row
def time_batches(setup: BenchSetup, small_call: Callable[[], Any], big_call: Callable[[], Any],
                 device: str = "cpu") -> tuple[dict[str, float], dict[str, float]]:
    """Latency at the small batch after `warmup` calls over `repeats`; the big batch with a fifth
    of each (at least 2 and 5). `device` picks the clock (CUDA events on CUDA)."""
    t1 = time_call(small_call, device=device, warmup=setup.warmup, repeats=setup.repeats)
    tb = time_call(big_call, device=device, warmup=max(2, setup.warmup // 5), repeats=max(5, setup.repeats // 5))
    return t1, tb


def fill_times(row: dict[str, Any], t1: dict[str, float], tb: dict[str, float], setup: BenchSetup,
               mem: float | None, method: str) -> None:
    small, big = setup.small, setup.big
    row.update(latency_ms=t1["median_ms"], p95_ms=t1["p95_ms"], latency_batch=small,
               batch=big, batch_ms=tb["median_ms"], throughput=big / tb["median_ms"] * 1000,
               peak_mem_mb=mem, mem_method=method)


def time_torch(row: dict[str, Any], model, inputs_by_batch: dict[int, torch.Tensor], setup: BenchSetup) -> None:
    small, big, device = setup.small, setup.big, setup.device
    with torch.inference_mode():
        t1, tb = time_batches(setup, lambda: model(inputs_by_batch[small]), lambda: model(inputs_by_batch[big]),
                              device=device)
        mem, method = peak_memory(lambda: model(inputs_by_batch[big]), device)
    fill_times(row, t1, tb, setup, mem, method)


def time_compiled(row: dict[str, Any], model, inputs_by_batch: dict[int, torch.Tensor], setup: BenchSetup) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in setup.batch_sizes:  # compile every shape before timing
            compiled(inputs_by_batch[b])
        sync(setup.device)
    row["compile_s"] = time.perf_counter() - t0
    with torch.inference_mode():
        time_torch(row, compiled, inputs_by_batch, setup)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def time_onnx(row: dict[str, Any], cand: Candidate, spec, setup: BenchSetup) -> None:
    from agecli.stages.export import export, load_exported, to_unit

    path = setup.out_dir / "onnx" / f"{_safe(cand.name)}.onnx"
    result = export(cand.path, "onnx", out=path, run=setup.run, force=True)  # the bench's own copy, redone
    row["parity_max_abs"] = result["parity"]["max_abs_age"]
    row["onnx_mb"] = result["bytes"] / 2 ** 20
    exported = load_exported(path, device=setup.device, threads=setup.threads)
    record_providers(row, exported.providers or [])
    small, big = setup.small, setup.big
    x = {b: with_mirror(to_unit(setup.faces[:b].numpy(), spec.input_size), setup.mirror) for b in setup.batch_sizes}
    t1, tb = time_batches(setup, lambda: exported.run(x[small]), lambda: exported.run(x[big]))
    mem, method = onnx_peak_memory(path, "images", x[big], setup.device, setup.threads)
    fill_times(row, t1, tb, setup, mem, method)


def with_mirror(images: np.ndarray | torch.Tensor, mirror: bool):
    """NCHW images, followed by their mirror images when `mirror`: the batch a mirrored answer runs."""
    if not mirror:
        return images
    if isinstance(images, torch.Tensor):
        return torch.cat([images, images.flip(-1)])
    return np.ascontiguousarray(np.concatenate([images, images[..., ::-1]]))


def onnx_peak_memory(path: Path, input_name: str, batch: np.ndarray, device: str,
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


def record_providers(row: dict[str, Any], providers: list[str]) -> None:
    """ONNX Runtime falls back to the CPU where its CUDA provider is not installed: say where it ran."""
    row["providers"] = ",".join(providers)
    row["device"] = "cuda" if providers[:1] == ["CUDAExecutionProvider"] else "cpu"


# --------------------------------------------------------------------------- a checkpoint's rows
def measure_checkpoint(cand: Candidate, setup: BenchSetup, backends, measured: Measured) -> None:
    """Load `cand`, score it on the test faces, then add one row per backend to `measured`."""
    from agecli.data.batches import to_input
    from agecli.modeling.checkpoint import load_checkpoint
    from agecli.engine.inference import predict_store

    device = setup.device
    model, spec = load_checkpoint(cand.path, device)
    base = _model_columns(cand, model, spec, setup)
    base.update(_seen_test_faces(cand.path, setup))
    frame = predict_store(model, spec, setup.store, setup.test_idx, device=device, mirror=setup.mirror)
    measured.frames[cand.name] = frame
    if setup.labelled:
        base.update(label_metrics(frame))

    def predict_fn(st, idx, model=model, spec=spec):
        return predict_store(model, spec, st, idx, device=device, mirror=setup.mirror)["age_pred"].to_numpy()

    measured.predictors[cand.name] = predict_fn
    inputs_by_batch = {b: with_mirror(to_input(setup.faces[:b], spec.input_size, spec.mean, spec.std, device=device),
                                      setup.mirror) for b in setup.batch_sizes}
    for backend in backends:
        measured.rows.append(_backend_row(base, backend, cand, model, spec, inputs_by_batch, setup))


def _seen_test_faces(path, setup: BenchSetup) -> dict[str, int]:
    """{"test_seen": n} when the checkpoint records learning from n of the test faces (a model
    from another run, or the default on a UTKFace run): its error is then not a held-out one."""
    from agecli.modeling.checkpoint import read_seen
    from agecli.store import face_keys

    seen = read_seen(path)
    count = seen.count(face_keys(setup.store.records, setup.test_idx)) if seen is not None else 0
    return {"test_seen": count} if count else {}


def _model_columns(cand: Candidate, model, spec, setup: BenchSetup) -> dict[str, Any]:
    """The columns every backend of a model shares: what it is, its size and its GFLOPs for one face."""
    from agecli.data.batches import to_input
    from agecli.modeling.backbones import count_parameters

    device = setup.device
    base = {"model": cand.name, "role": cand.role, "arch": spec.arch, "encoding": spec.encoding.get("name"),
            "input_size": spec.input_size, "params_m": count_parameters(model) / 1e6,
            "file_mb": cand.path.stat().st_size / 2 ** 20, "path": str(cand.path), "device": device,
            "threads": setup.threads, "mirror": setup.mirror}
    flops = count_flops(model, to_input(setup.faces[:1], spec.input_size, spec.mean, spec.std, device=device))
    base["gflops"] = None if flops is None else flops / 1e9
    return base


def _backend_row(base: dict[str, Any], backend: str, cand: Candidate, model, spec,
                 inputs_by_batch: dict[int, torch.Tensor], setup: BenchSetup) -> dict[str, Any]:
    row = dict(base, backend=backend, status="ok")
    try:
        if backend == "eager":
            time_torch(row, model, inputs_by_batch, setup)
        elif backend == "compile":
            time_compiled(row, model, inputs_by_batch, setup)
        else:
            time_onnx(row, cand, spec, setup)
    except AgecliError as exc:
        row.update(status="failed", error=str(exc).splitlines()[0][:300])
    except Exception as exc:  # a backend that cannot run this model is a result, not a crash
        row.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    return row
