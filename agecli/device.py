"""Which device a stage runs on: the one place that resolves `--device auto` and refuses a
CUDA device on a machine where torch sees no GPU, in one wording.

    resolve_device("auto")   -> "cuda" when torch sees a GPU, else "cpu"
    require_device("cuda:1") -> "cuda:1", or AgecliError(cuda_absent("cuda:1")) without a GPU,
                                or an AgecliError naming the GPUs there are when it has no GPU 1

torch is imported inside the functions so the root helpers stay cheap to import.
"""

from __future__ import annotations

import re

from agecli.errors import AgecliError


def check_device_name(device: object, option: str = "--device") -> None:
    """auto, cpu, cuda or cuda:N; anything else (CPU, tpu, gpu) is refused in these words
    rather than by torch's parser, mid-stage."""
    if not (isinstance(device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", device)):
        raise AgecliError(f"{option} {device!r} is not a device; use auto, cpu, cuda or cuda:N.")


def resolve_device(device: str) -> str:
    """"auto" is cuda when torch sees a GPU, else cpu; any other name is returned as given."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cuda_absent(device: str) -> str:
    """The message for a CUDA device asked for on a machine without one."""
    return f"--device {device} was asked for but torch sees no CUDA GPU on this machine; use --device cpu."


def require_device(device: str) -> str:
    """`resolve_device`, refusing a name that is not a device and a CUDA device that torch
    cannot see (AgecliError)."""
    device = device if isinstance(device, str) else str(device)   # a torch.device from Python callers
    check_device_name(device)
    device = resolve_device(device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise AgecliError(cuda_absent(device))
        if gpu_index(device) >= torch.cuda.device_count():   # else CUDA's 'invalid device ordinal', mid-stage
            raise AgecliError(f"--device {device} was asked for but torch sees {gpus_here()}; "
                              "use one of those, or --device cuda.")
    return device


def gpu_index(device: str) -> int:
    """The GPU a CUDA device name points at: cuda -> 0, cuda:2 -> 2."""
    suffix = device.partition(":")[2]
    return int(suffix) if suffix.isdigit() else 0


def gpus_here() -> str:
    """'1 CUDA GPU(s) on this machine (cuda:0)', for messages."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return "no CUDA GPU on this machine"
    there = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
    return f"{count} CUDA GPU(s) on this machine ({there})"
