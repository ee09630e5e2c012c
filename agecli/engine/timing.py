"""Measuring a model honestly: time per call, peak memory, FLOPs and the machine it ran on.

    time_call(fn, device="cuda", warmup=10, repeats=50)  -> {"median_ms", "p95_ms", "mean_ms"}
    peak_memory(fn, device)                               -> (MB above the baseline, how it was measured)
    count_flops(model, x)                                 -> FLOPs of one forward pass, or None
    machine_info(device, threads)                         -> versions, CPU / GPU names, thread count

Every timing loop of agecli belongs here: `agecli.stages.bench` times each model and backend
with it, and a stage that reports its own speed (distill's student/teacher ratio, export's
ONNX check) can use `time_call` as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from agecli.rundir import environment


def sync(device: str) -> None:
    """Wait for the GPU's queued work, so that a clock read after it covers that work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], *, device: str = "cpu", warmup: int = 10, repeats: int = 50,
              clock: str = "auto") -> dict[str, float]:
    """Median / p95 / mean milliseconds per call of `fn`, after `warmup` untimed calls.

    clock "auto": CUDA events on a CUDA device (the GPU's own time for the call), perf_counter
    elsewhere. clock "perf_counter": host wall time on every device, synchronising before and
    after each call on CUDA (what a caller sees, launch overhead included). Divide by the batch
    size for a time per face."""
    if clock not in ("auto", "perf_counter"):
        raise ValueError(f"clock must be 'auto' or 'perf_counter', got {clock!r}")
    for _ in range(warmup):
        fn()
    sync(device)
    if device.startswith("cuda") and clock == "auto":
        times = _cuda_event_times(fn, repeats)
    else:
        times = _wall_times(fn, repeats, device)
    arr = np.asarray(times)
    return {"median_ms": float(np.median(arr)), "p95_ms": float(np.percentile(arr, 95)), "mean_ms": float(arr.mean())}


def _cuda_event_times(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _wall_times(fn: Callable[[], Any], repeats: int, device: str) -> list[float]:
    cuda = device.startswith("cuda")
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return times


# --------------------------------------------------------------------------- memory
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
    """Peak memory (MB) while `fn` runs above what was live before it, and how it was measured:
    CUDA max_memory_allocated on a GPU; on a CPU the rise of the process's resident-set
    high-water mark (VmHWM, reset through /proc/self/clear_refs) over the resident set before."""
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


# --------------------------------------------------------------------------- cost and machine
def count_flops(model: torch.nn.Module, x: torch.Tensor) -> float | None:
    """FLOPs of `model(x)` (torch.utils.flop_counter), or None when an operator has no formula."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            model(x)
        return float(counter.get_total_flops())
    except Exception:  # an operator without a flop formula: leave the cell empty
        return None


def machine_info(device: str, threads: int) -> dict[str, Any]:
    """What a timing depends on: `agecli.rundir.environment()` plus thread count, device, CPU
    model, library versions and, on CUDA, the GPU's name and CUDA version."""
    info = environment()
    info["torch_threads"] = threads
    info["device"] = device
    info["cpu"] = _cpu_name()
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


def _cpu_name() -> str:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return cpu
