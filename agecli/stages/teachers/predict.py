"""A teacher's answers over rows of a store, batch by batch (the distillation cache fills from it)."""

from __future__ import annotations

import numpy as np
import torch

from agecli.data.batches import Batches, apply_augment, to_nchw_unit
from agecli.modeling.distributions import NUM_AGES
from agecli.stages.teachers.base import Teacher


def predict_teacher(teacher: Teacher, store, indices, *, batch_size: int = 256, device: str = "cpu",
                    progress=None, augment_params: torch.Tensor | None = None,
                    view_size: int | None = None) -> dict[str, np.ndarray]:
    """Teacher outputs over store rows: {"age": (n,), "probs": (n, 101), ["features"]}.

    Un-augmented, unless `augment_params` gives `agecli.data.batches.draw_augment` numbers,
    one row per index (indices sorted): then each face is that crop, made at `view_size` px."""
    indices = np.asarray(indices, dtype=np.int64)
    if augment_params is not None and (np.any(np.diff(indices) <= 0) or len(augment_params) != len(indices)):
        raise ValueError("augment_params needs sorted unique indices and one row of numbers per index")
    ages, probs, feats = [], [], []
    batches = Batches(store, indices, batch_size)
    for done, batch in enumerate(batches, 1):
        x01 = to_nchw_unit(batch.images, device)
        if augment_params is not None:
            rows = np.searchsorted(indices, batch.index.numpy())
            x01 = apply_augment(x01, view_size or x01.shape[-1], augment_params[torch.from_numpy(rows)])
        out = teacher(x01)
        ages.append(out.age.float().cpu().numpy())
        probs.append(out.probs.float().cpu().numpy())
        if out.features is not None:
            feats.append(out.features.float().cpu().numpy())
        if progress:
            progress("teacher", done, len(batches))
    result = {"age": np.concatenate(ages) if ages else np.zeros(0, np.float32),
              "probs": np.concatenate(probs) if probs else np.zeros((0, NUM_AGES), np.float32)}
    if feats:
        result["features"] = np.concatenate(feats)
    return result
