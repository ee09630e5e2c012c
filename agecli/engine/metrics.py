"""Scoring predictions: the metrics every stage reports.

    age_metrics(pred, true, age_std=None)  -> MAE, RMSE, CS(1..10), LAP epsilon-error
    group_metrics(pred_group, true_group)  -> Adience exact and 1-off accuracy
    score(frame)                           -> all that apply to a frame from `predict_store`
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from agecli.labels import group_of_age


def age_metrics(pred, true, age_std=None) -> dict[str, float]:
    """MAE, RMSE, CS(theta) for theta 1..10 (fraction with |error| <= theta), and the LAP
    epsilon-error 1 - exp(-(pred - mean)^2 / (2 sigma^2)) where per-face sigma is known."""
    pred = np.asarray(pred, dtype=float)
    true = np.asarray(true, dtype=float)
    keep = ~np.isnan(true)
    pred, true = pred[keep], true[keep]
    if len(true) == 0:
        return {"n": 0}
    err = np.abs(pred - true)
    out: dict[str, float] = {
        "n": int(len(true)),
        "mae": float(err.mean()),
        "rmse": float(np.sqrt((err ** 2).mean())),
    }
    for theta in range(1, 11):
        out[f"cs{theta}"] = float((err <= theta).mean())
    if age_std is not None:
        std = np.asarray(age_std, dtype=float)[keep]
        has = ~np.isnan(std) & (std > 0)
        if has.any():
            eps = 1 - np.exp(-((pred[has] - true[has]) ** 2) / (2 * std[has] ** 2))
            out["epsilon_error"] = float(eps.mean())
    return out


def group_metrics(pred_group, true_group) -> dict[str, float]:
    """Adience exact and 1-off accuracy (1-off: the predicted group is adjacent or exact)."""
    pred_group = np.asarray(pred_group, dtype=int)
    true_group = np.asarray(true_group, dtype=int)
    keep = true_group >= 0
    if not keep.any():
        return {}
    diff = np.abs(pred_group[keep] - true_group[keep])
    return {"group_exact": float((diff == 0).mean()), "group_1off": float((diff <= 1).mean()),
            "group_n": int(keep.sum())}


def score(frame: pd.DataFrame) -> dict[str, Any]:
    """All metrics that apply to a predictions frame from `agecli.engine.inference.predict_store`."""
    out: dict[str, Any] = age_metrics(frame["age_pred"], frame["age"], frame.get("age_std"))
    true_group = frame["group"].to_numpy()
    if (true_group >= 0).any():
        pred_group = frame["group_pred"] if "group_pred" in frame else frame["age_pred"].map(group_of_age)
        out.update(group_metrics(pred_group, true_group))
    if "gender_pred" in frame:
        known = frame["gender"] >= 0
        if known.any():
            out["gender_accuracy"] = float((frame.loc[known, "gender_pred"] == frame.loc[known, "gender"]).mean())
    return out
