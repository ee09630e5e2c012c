"""Multi-process training through `torchrun` (DistributedDataParallel).

`torchrun --nproc_per_node 2 -m agecli.cli train ...` sets RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT; `setup()` reads them, joins the process group (NCCL on CUDA, gloo on
CPU) and pins each process to its local GPU. Without those variables everything here is a
no-op and training runs in one process. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from agecli.device import resolve_device
from agecli.errors import AgecliError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> World:
    """The process's place in a torchrun launch (rank 0 of 1 when not launched by torchrun)."""
    return World(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: str) -> tuple[World, str]:
    """Join the process group when launched by torchrun; returns the world and this rank's device."""
    device = resolve_device(device)
    world = from_env()
    if not world.distributed:
        return world, device
    if device.startswith("cuda"):
        device = f"cuda:{_local_gpu(world)}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return world, device


def _local_gpu(world: World) -> int:
    """This rank's GPU; one process per GPU, so more processes than GPUs is refused here
    rather than failing inside CUDA with 'invalid device ordinal'."""
    gpus = torch.cuda.device_count()
    if world.local_rank >= gpus:
        raise AgecliError(
            f"torchrun started more processes on this machine than torch sees GPUs ({gpus}): "
            f"process {world.local_rank} has no GPU of its own.\n"
            f"Launch with --nproc_per_node {gpus}, or train on the CPU with --device cpu (gloo).")
    return world.local_rank


def current() -> World:
    """The world of an already initialised process group (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), world_size=dist.get_world_size(),
                     local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's value of a picklable object on every rank (used for names and stop decisions)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_mean(value: float, world: World, device: str = "cpu") -> float:
    """Mean of a float over ranks (training loss for the history)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world.world_size
