"""DistributedDataParallel: 2 CPU processes with gloo train one tiny model in lockstep."""

from __future__ import annotations

import os
import socket

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from agecli.modeling.checkpoint import ModelSpec, read_checkpoint
from agecli.modeling.encodings import build_encoding
from agecli.modeling.backbones import build_model
from agecli.store import FaceStore
from agecli.engine.loop import fit
from agecli.options import TrainOptions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, run: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    store = FaceStore.open(run)
    torch.manual_seed(0)
    enc = build_encoding("regression")
    model = build_model("mobilenet_v3_small", enc)
    spec = ModelSpec(arch="mobilenet_v3_small", encoding=enc.to_dict(), input_size=32)
    result = fit(model, spec, store, store.indices("train"), store.indices("val")[:16], out,
                 TrainOptions(epochs=3, time_limit=1e-5, batch_size=16, max_batches=2, threads=1, workers=1,
                              device="cpu"))
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out, f"rank{rank}.weights"))
    torch.save({"world_size": result["world_size"], "best_epoch": result["best_epoch"],
                "planned_epochs": result["planned_epochs"]}, os.path.join(out, f"rank{rank}.result"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_cpu_processes_with_gloo(synthetic_run, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(synthetic_run), str(out)), nprocs=2, join=True)
    w0 = torch.load(out / "rank0.weights", weights_only=True)
    w1 = torch.load(out / "rank1.weights", weights_only=True)
    torch.manual_seed(0)
    start = build_model("mobilenet_v3_small", build_encoding("regression")).state_dict()
    trainable = [k for k in w0 if w0[k].is_floating_point() and "running" not in k]
    # gradients were averaged: both ranks hold the same weights, and they moved
    for key in trainable:
        assert torch.allclose(w0[key], w1[key], atol=1e-6), key
    assert any(not torch.allclose(w0[k], start[k]) for k in trainable)
    r0 = torch.load(out / "rank0.result", weights_only=True)
    r1 = torch.load(out / "rank1.result", weights_only=True)
    assert r0["world_size"] == r1["world_size"] == 2 and r0["best_epoch"] == r1["best_epoch"]
    # the time limit cut the schedule after epoch 1 on both ranks (rank 0's decision, broadcast)
    assert r0["planned_epochs"] == r1["planned_epochs"] == 1
    # only rank 0 wrote the run's files; the last checkpoint equals rank 0's weights
    assert len(pd.read_csv(out / "history.csv")) == 1
    saved = read_checkpoint(out / "last.pt")["state_dict"]
    assert all(torch.equal(saved[k], w0[k]) for k in trainable)


def test_more_processes_than_gpus_is_refused_before_cuda_fails(monkeypatch):
    """torchrun --nproc_per_node 2 on a one-GPU machine: rank 1 has no GPU of its own. It used
    to die inside CUDA ('invalid device ordinal'); now it says what to launch instead."""
    from agecli.engine import distributed
    from agecli.errors import AgecliError

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail(f"set_device({device}) was reached"))
    with pytest.raises(AgecliError, match=r"(?s)than torch sees GPUs \(1\).*--nproc_per_node 1, or .*--device cpu"):
        distributed.setup("cuda")
