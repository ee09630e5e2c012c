"""Robustness to the 15 ImageNet-C corruptions (`agecli.data.corruptions`), as Greco et al. 2021 measure it.

Up to `limit` labelled test faces (evenly spaced), corrupted identically for every model at
each severity 1-5; per model the MAE per corruption and severity, the mean corruption error
mCE (mean MAE over corruptions and severities) and mCE relative to the clean MAE on the same
faces.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from agecli.errors import AgecliError
from agecli.stages.bench.measure import Predictor


def robustness(store, test_idx: np.ndarray, predictors: dict[str, Predictor], severities: Sequence[int],
               names: Sequence[str] | None, limit: int, seed: int, progress=None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(one row per model, corruption and severity; per-model summary with mCE)."""
    from agecli.data.corruptions import resolve_names

    names = resolve_names(names)
    bad = [s for s in severities if s not in (1, 2, 3, 4, 5)]
    if bad:
        raise AgecliError(f"severities must be within 1-5, got {bad}.")
    idx, true = _labelled_faces(store, test_idx, limit)
    clean = {name: float(np.abs(fn(store, idx) - true).mean()) for name, fn in predictors.items()}
    frame = _corrupted_errors(store, idx, true, predictors, clean, names, severities, seed, progress)
    summary = {model: _summary(part, clean[model], len(idx)) for model, part in frame.groupby("model")}
    return frame, summary


def _labelled_faces(store, test_idx: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to `limit` test faces, evenly spaced, that have an age label; and those ages."""
    idx = np.sort(test_idx)
    if limit and len(idx) > limit:
        idx = idx[np.linspace(0, len(idx) - 1, limit).astype(int)]
    labelled = store.records["age"].to_numpy(dtype=float)[idx]
    keep = ~np.isnan(labelled)
    return idx[keep], labelled[keep]


def _corrupted_errors(store, idx, true, predictors, clean, names, severities, seed, progress) -> pd.DataFrame:
    from agecli.data.corruptions import CORRUPTIONS, corrupt_batch
    from agecli.store import FaceStore

    clean_images = np.ascontiguousarray(store.images[idx])
    records = store.records.iloc[idx].reset_index(drop=True)
    local = np.arange(len(idx))
    rows = []
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
    return pd.DataFrame(rows)


def _summary(part: pd.DataFrame, clean: float, faces: int) -> dict[str, Any]:
    mce = float(part["mae"].mean())
    return {
        "clean_mae": clean, "mce": mce, "mce_relative": mce / clean if clean else None,
        "relative_degradation": float((part["mae"] - clean).mean() / clean) if clean else None,
        "by_family": {k: float(v) for k, v in part.groupby("family")["mae"].mean().items()},
        "by_corruption": {k: float(v) for k, v in part.groupby("corruption")["mae"].mean().items()},
        "faces": faces,
    }
