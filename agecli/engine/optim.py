"""The optimiser, its learning-rate schedule and the time budget that can shorten it.

    make_optimizer(model, options)          AdamW or SGD (Nesterov); no weight decay on norms/biases;
                                            with options.layer_decay < 1, lower rates for earlier layers
    make_scheduler(optimizer, options, n)   linear warm-up, then cosine to 1% (`CosineSchedule`)
    epochs_within(limit_s, walls, planned)  how many epochs fit in a time limit
    TimeBudget                              cuts the planned epochs and the cosine after each epoch
"""

from __future__ import annotations

import math
from typing import Any

import torch

from agecli.engine import distributed
from agecli.errors import AgecliError
from agecli.options import TrainOptions


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Weight decay on weights only: biases and norm scales (1-d tensors) are left alone.

    `layer_decay` < 1 (layer-wise learning-rate decay, as BEiT and timm fine-tune): the heads
    keep the full rate and each backbone layer below them (`layer_ids`) gets `layer_decay`
    times the rate of the one above, so a pretrained stem moves least. Each group carries its
    scale in `lr_scale`; its "lr" starts at that share of the peak, which the schedule scales."""
    if layer_decay == 1.0:   # two groups, as every run before layer decay existed (their last.pt resumes)
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    ids = layer_ids([name for name, _ in named])
    top = max(ids.values(), default=0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in sorted(named, key=lambda item: -ids[item[0]]):   # the heads' full rate first
        decays = p.ndim > 1
        group = groups.setdefault((ids[name], decays), {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                                        "lr_scale": layer_decay ** (top - ids[name])})
        group["params"].append(p)
    return list(groups.values())


def layer_ids(names: list[str]) -> dict[str, int]:
    """Depth of each parameter, 0 at the input, counted in the order the model registers them.

    A backbone layer is the module path up to its first numbered child (`backbone.features.3`,
    `backbone.body.stages.1`: a torchvision feature block, a dlib stage), or the parameter's own
    module before the first numbered one (a stem conv). The heads, and what follows the last
    numbered layer (a final norm on the pooled features, new as the heads are), are the top
    layer, one above the last."""
    ids: dict[str, int] = {}
    layers: dict[str, int] = {}
    top, numbered_seen = [], False
    for name in names:
        parts = name.split(".")
        numbered = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if parts[0] != "backbone" or (numbered is None and numbered_seen):
            top.append(name)
            continue
        numbered_seen |= numbered is not None
        key = ".".join(parts[:numbered + 1] if numbered is not None else parts[:-1])
        ids[name] = layers.setdefault(key, len(layers))
    for name in top:
        ids[name] = len(layers)
    return ids


def make_optimizer(model: torch.nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    groups = param_groups(model, options.weight_decay, options.layer_decay)
    for group in groups:
        group["lr"] = options.lr * group.get("lr_scale", 1.0)
    if options.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=options.lr)
    if options.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=options.lr, momentum=0.9, nesterov=True)
    raise AgecliError(f"unknown optimizer {options.optimizer!r}; choose adamw or sgd.")


class CosineSchedule:
    """Per-step LR multiplier: linear warm-up from 1% to 100%, then cosine down to 1%.

    A callable object rather than a closure so that LambdaLR saves its state (total and warm-up
    steps) in last.pt, and so that `set_total` can end the cosine earlier under a time limit."""

    def __init__(self, total: int, warmup: int):
        self.total, self.warmup = max(1, total), min(max(1, total) - 1, warmup)

    def set_total(self, total: int) -> None:
        self.total = max(1, total)
        self.warmup = min(self.warmup, self.total - 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return 0.01 + 0.99 * step / max(1, self.warmup)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, options: TrainOptions,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = CosineSchedule(options.epochs * steps_per_epoch, int(round(options.warmup_epochs * steps_per_epoch)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def epochs_within(limit_s: float, walls: list[float], planned: int) -> int:
    """How many epochs fit in a time limit, given the wall seconds of those done so far.

    The first epoch pays for warm-up (cuDNN autotuning, caches), so the mean of the last few
    after it predicts the rest; from the first alone we only stop if one more would not fit.
    Never more than `planned`, never fewer than the epochs done."""
    done, left = len(walls), limit_s - sum(walls)
    if done == 1:
        return done if left < walls[0] else planned
    recent = walls[1:][-3:]
    per_epoch = 1.05 * sum(recent) / len(recent)
    return max(done, min(planned, done + int(left // per_epoch)))


class TimeBudget:
    """Training that must end within `limit_minutes` (None: no limit): after each epoch the
    planned epochs shrink to what still fits, and the cosine schedule ends there."""

    def __init__(self, limit_minutes: float | None, schedule: CosineSchedule, steps_per_epoch: int):
        self.limit_minutes, self.schedule, self.steps = limit_minutes, schedule, steps_per_epoch

    @property
    def planned(self) -> int:
        """Epochs the schedule runs for: options.epochs, or fewer after a cut."""
        return math.ceil(self.schedule.total / self.steps)

    def resume(self, epochs: int) -> None:
        """A resumed run follows this call's epochs (as before), within a limit's earlier cut."""
        wanted = epochs * self.steps
        self.schedule.set_total(min(self.schedule.total, wanted) if self.limit_minutes else wanted)

    def replan(self, epoch: int, walls: list[float], world: distributed.World) -> int | None:
        """The new number of planned epochs when the limit cuts them after `epoch`, else None.
        Rank 0 decides: ranks that disagreed on the epoch count would wait on each other."""
        planned = self.planned
        if self.limit_minutes is None or epoch >= planned:
            return None
        fits = distributed.broadcast(epochs_within(self.limit_minutes * 60, walls, planned), world)
        if fits >= planned:
            return None
        self.schedule.set_total(fits * self.steps)
        return fits
