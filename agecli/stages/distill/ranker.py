"""The ranking teacher of `--method ordinal` (Zhao et al. 2021): a model trained here to put
shuffled sequences of k faces back in age order (ListMLE).

    train_rank_teacher(store, train_idx, val_idx, out_dir, arch=..., size=..., k=4)  -> its checkpoint
    listmle(scores, ages, k)      the ranking loss
    rank_accuracy(scores, ages)   pairs ordered correctly (0.5 is chance)
    rank_validate(...)            `fit`'s validation for a ranker: val rank accuracy (monitored, higher better)
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from agecli.engine.checkpointer import Monitor
from agecli.engine.inference import predict_store
from agecli.engine.loop import fit
from agecli.modeling.backbones import build_model, default_normalisation
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


DEFAULT_PATIENCE = 3  # epochs without a better val rank accuracy before the ranker stops (no --patience)
RANK_MONITOR = Monitor("rank_accuracy", higher_is_better=True)


def rank_validate(model: torch.nn.Module, spec: ModelSpec, store, val_idx, device: str,
                  batch_size: int) -> dict[str, Any]:
    """A ranker's validation for `fit`: its pairwise ranking accuracy on the val rows (its
    scores are no ages, so MAE would mean nothing)."""
    frame = predict_store(model, spec, store, val_idx, device=device, batch_size=batch_size)
    return {"rank_accuracy": rank_accuracy(frame["age_pred"], frame["age"]), "n": int(len(frame))}


def train_rank_teacher(store, train_idx, val_idx, out_dir: Path, *, arch: str, size: int, k: int = 4,
                       options: TrainOptions | None = None, pretrained: str | None = None,
                       alignment: dict | None = None, progress: ProgressFn | None = None) -> Path:
    """Train a ranking teacher: shuffled sequences of k faces with distinct ages, a score head
    trained with ListMLE to recover their age order, validated every epoch by its pairwise
    ranking accuracy on `val_idx`. It keeps the best epoch, stops after `options.patience`
    (default 3) epochs without improvement, at most `options.epochs`, and writes history.csv
    (train_listmle, val_rank_accuracy per epoch) in out_dir. Returns its rank_teacher.pt (an
    agecli checkpoint whose "age" output is a rank score, label_space "rank scores", its
    metrics the best val rank accuracy and the per-epoch history), reused when it is there."""
    options = options or TrainOptions()
    out_dir = Path(out_dir)
    done = out_dir / "rank_teacher.pt"
    if done.exists():
        return done
    torch.manual_seed(options.seed)
    enc = Regression()
    # the student's pretrained backbone (dlib's weights for dlib_*), with the input normalisation
    # those weights expect: fit trains and validates on spec.mean/std
    model = build_model(arch, enc, pretrained=pretrained)
    mean, std = default_normalisation(arch)
    options = replace(options, patience=options.patience or DEFAULT_PATIENCE)
    spec = ModelSpec(arch=arch, encoding=enc.to_dict(), input_size=size, mean=mean, std=std,
                     alignment=alignment or {}, label_space="rank scores",
                     provenance={"stage": "distill", "task": "rank", "k": k, "pretrained": pretrained,
                                 "options": options.to_dict()})
    results = fit(model, spec, store, train_idx, val_idx, out_dir, options, loss_fn=_listmle_loss(k),
                  progress=progress, validate_fn=rank_validate, monitor=RANK_MONITOR)
    model, spec = load_checkpoint(out_dir / "best.pt")
    spec.metrics = _rank_metrics(spec.metrics, results, out_dir) if len(val_idx) else {}
    save_checkpoint(done, model, spec)
    return done


def _listmle_loss(k: int):
    """ListMLE on the labelled faces of each batch, as a loss function of `fit`."""
    def loss_fn(outputs, batch, x):
        known = ~torch.isnan(batch.age)
        loss = listmle(outputs["age"][known].squeeze(1), batch.age[known], k)
        if loss is None:  # no sequence of distinct ages: keep the graph connected (DDP)
            loss = outputs["age"].sum() * 0.0
        return loss, {"listmle": float(loss.detach())}
    return loss_fn


def _rank_metrics(best: dict[str, Any], results: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The kept epoch's val rank accuracy, and every epoch's (with its ListMLE loss) from history.csv."""
    history = pd.read_csv(out_dir / "history.csv")
    epochs = [{"epoch": int(row.epoch), "listmle": float(row.train_listmle),
               "rank_accuracy": float(row.val_rank_accuracy)} for row in history.itertuples()]
    return {"split": "val", "epoch": best.get("epoch"), "rank_accuracy": best.get("rank_accuracy"),
            "n": best.get("n"), "epochs_run": results["epochs_run"], "stopped_early": results["stopped_early"],
            "history": epochs}
