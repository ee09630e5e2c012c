"""The ranking teacher of `--method ordinal` (Zhao et al. 2021): a model trained here to put
shuffled sequences of k faces back in age order (ListMLE).

    train_rank_teacher(store, train_idx, val_idx, out_dir, arch=..., size=..., k=4)  -> its checkpoint
    listmle(scores, ages, k)      the ranking loss
    rank_accuracy(scores, ages)   pairs ordered correctly (0.5 is chance)
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agecli.engine.inference import predict_store
from agecli.engine.loop import fit
from agecli.modeling.backbones import IMAGENET_MEAN, IMAGENET_STD, build_model
from agecli.modeling.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from agecli.modeling.encodings import Regression
from agecli.options import TrainOptions
from agecli.progress import ProgressFn


def listmle(scores: torch.Tensor, ages: torch.Tensor, k: int) -> torch.Tensor | None:
    """ListMLE over the batch cut into random sequences of k faces; sequences with tied ages are
    skipped. Higher score = older.

    The rows are shuffled here because a batch arrives sorted by store row (sequential reads),
    and UTKFace rows are sorted by file name, which starts with the age: consecutive faces
    would form nearly sorted, mostly tied sequences."""
    n = (len(scores) // k) * k
    if n == 0:
        return None
    perm = torch.randperm(len(scores), device=scores.device)[:n]
    s, a = scores[perm].float().view(-1, k), ages[perm].float().view(-1, k)
    order = torch.argsort(a, dim=1, descending=True)
    a_sorted = torch.gather(a, 1, order)
    distinct = (a_sorted[:, :-1] > a_sorted[:, 1:]).all(1)
    if not distinct.any():
        return None
    s_sorted = torch.gather(s, 1, order)[distinct]
    lse = torch.logcumsumexp(s_sorted.flip(1), 1).flip(1)
    return (lse - s_sorted).sum(1).mean()


def rank_accuracy(scores: np.ndarray, ages: np.ndarray) -> float:
    """Fraction of face pairs with different ages that the scores order correctly, a tie counting
    half (Kendall-style: 0.5 is chance, or a constant score)."""
    scores, ages = np.asarray(scores, float), np.asarray(ages, float)
    ds, da = scores[:, None] - scores[None, :], ages[:, None] - ages[None, :]
    pairs = da > 0
    if not pairs.any():
        return math.nan
    return float((ds[pairs] > 0).mean() + 0.5 * (ds[pairs] == 0).mean())


def train_rank_teacher(store, train_idx, val_idx, out_dir: Path, *, arch: str, size: int, k: int = 4,
                       options: TrainOptions | None = None, pretrained: str | None = None,
                       alignment: dict | None = None, progress: ProgressFn | None = None) -> Path:
    """Train a ranking teacher: shuffled sequences of k faces with distinct ages, a score head
    trained with ListMLE to recover their age order. Returns its rank_teacher.pt (an agecli
    checkpoint whose "age" output is a rank score, label_space "rank scores"), reused when
    it is there already."""
    options = options or TrainOptions()
    out_dir = Path(out_dir)
    done = out_dir / "rank_teacher.pt"
    if done.exists():
        return done
    torch.manual_seed(options.seed)
    enc = Regression()
    model = build_model(arch, enc, pretrained=pretrained)
    spec = ModelSpec(arch=arch, encoding=enc.to_dict(), input_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     alignment=alignment or {}, label_space="rank scores",
                     provenance={"stage": "distill", "task": "rank", "k": k, "options": options.to_dict()})

    def loss_fn(outputs, batch, x):
        known = ~torch.isnan(batch.age)
        loss = listmle(outputs["age"][known].squeeze(1), batch.age[known], k)
        if loss is None:
            loss = outputs["age"].sum() * 0.0
        return loss, {"listmle": float(loss.detach())}

    # no validation inside fit: MAE means nothing for scores; ranking accuracy is measured below
    fit(model, spec, store, train_idx, np.zeros(0, dtype=np.int64), out_dir, replace(options, patience=None),
        loss_fn=loss_fn, progress=progress)
    model, spec = load_checkpoint(out_dir / "best.pt")
    metrics: dict[str, Any] = {}
    if len(val_idx):
        frame = predict_store(model, spec, store, val_idx, device="cpu")
        metrics = {"split": "val", "rank_accuracy": rank_accuracy(frame["age_pred"], frame["age"]), "n": len(frame)}
    spec.metrics = metrics
    save_checkpoint(done, model, spec)
    return done
