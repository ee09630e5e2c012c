"""The table's accuracy and comparison columns, from each model's test predictions and timings.

A run whose test faces have age labels gets MAE / CS(5) / gender accuracy against them. A
run without (a `folder` run: photos pseudo-labelled for distillation, as in Greco et al.
2021) gets `mae_vs_reference` instead: the mean absolute difference, in years, between each
model's age and the dlib-age reference's age on the same test faces (agreement with the
model the student copied, not error against truth); without the reference row either, no
accuracy at all. `accuracy_case` says which case applies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from agecli.stages.bench.candidates import REFERENCE

AGREEMENT = "mae_vs_reference"                 # accuracy column of a run without test labels
# how a bench measured accuracy (results["accuracy"])
ACCURACY_NOTES = {
    "labels": "MAE / CS(5) / gender accuracy against the test split's labels",
    "reference": (f"the test faces have no age labels, so no model has an error against true ages; "
                  f"`{AGREEMENT}` is the mean |model age - {REFERENCE} age| over the same test faces, i.e. "
                  f"agreement with the reference (a student pseudo-labelled by it copies it; this says how "
                  f"faithfully, not how right either is)"),
    "none": (f"the test faces have no age labels and the {REFERENCE} reference did not run, so no accuracy "
             f"is reported: size and speed only"),
}


def accuracy_case(labelled: bool, frames: dict[str, pd.DataFrame]) -> str:
    """"labels", "reference" (agreement with the reference's ages) or "none" (see ACCURACY_NOTES)."""
    return "labels" if labelled else ("reference" if REFERENCE in frames else "none")


def predict_frame(store, indices, ages: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Predicted ages beside the test records, in the shape `agecli.stages.evaluate.score` reads."""
    rec = store.records.iloc[indices].reset_index(drop=True)
    frame = pd.DataFrame({"index": indices, "age_pred": ages, **(extra or {})})
    return pd.concat([frame, rec[["path", "age", "age_std", "gender", "race", "group", "fold", "split"]]], axis=1)


def label_metrics(frame: pd.DataFrame) -> dict[str, Any]:
    """The table's accuracy columns against the test labels, scored as `agecli evaluate` does."""
    from agecli.engine.metrics import score

    m = score(frame)
    return {"mae": m.get("mae"), "cs5": m.get("cs5"), "gender_acc": m.get("gender_accuracy"), "n_test": m.get("n")}


def fill_agreement(rows: list[dict[str, Any]], frames: dict[str, pd.DataFrame]) -> None:
    """Fill `mae_vs_reference` in every model's rows: mean |age - reference age| over the test
    faces (the eager predictions; every backend of a model gets its model's value, and the
    ONNX parity check bounds how much the other backends differ). The reference's own rows
    are left empty."""
    ref = frames[REFERENCE]
    for row in rows:
        frame = frames.get(row["model"])
        if row["model"] == REFERENCE or frame is None:
            continue
        pred = frame.set_index("index")["age_pred"].reindex(ref["index"]).to_numpy(dtype=float)
        diff = np.abs(pred - ref["age_pred"].to_numpy(dtype=float))
        row[AGREEMENT] = float(np.nanmean(diff)) if np.isfinite(diff).any() else None
        row["n_test"] = int(np.isfinite(diff).sum())


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Latency ratios teacher / student (and reference / student), per backend, from this process."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("latency_ms")]
    out = []
    for s in (r for r in ok if r["role"] == "student"):
        for t in (r for r in ok if r["role"] in ("teacher", "reference")):
            if t["backend"] != s["backend"] and t["role"] != "reference":
                continue
            out.append({"student": s["model"], "teacher": t["model"], "student_backend": s["backend"],
                        "teacher_backend": t["backend"],
                        "speedup_latency": t["latency_ms"] / s["latency_ms"],
                        "speedup_throughput": s["throughput"] / t["throughput"],
                        "mae_delta": (s["mae"] - t["mae"]) if s.get("mae") is not None and t.get("mae") is not None else None})
    return out


def error_by_age(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """MAE and bias per model and true-age decade (80 = 80+)."""
    parts = []
    for name, frame in frames.items():
        f = frame[frame["age"].notna()]
        decade = (f["age"] // 10 * 10).clip(upper=80).astype(int)
        err = (f["age_pred"] - f["age"])
        g = pd.DataFrame({"decade": decade, "abs": err.abs(), "signed": err}).groupby("decade")
        part = g.agg(n=("abs", "size"), mae=("abs", "mean"), bias=("signed", "mean")).reset_index()
        part.insert(0, "model", name)
        parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["model", "decade", "n", "mae", "bias"])
