"""Running a model over a face store: one row of predictions per face, with its labels.

    predict_store(model, spec, store, indices)  -> DataFrame (index, age_pred, [female_prob,
                                                   gender_pred, group_pred], path, age, ...)
"""

from __future__ import annotations

import pandas as pd
import torch

from agecli.data.batches import Batches, to_input
from agecli.modeling.checkpoint import ModelSpec
from agecli.modeling.decode import decode
from agecli.progress import ProgressFn
from agecli.store import FaceStore

LABEL_COLUMNS = ["path", "age", "age_std", "gender", "race", "group", "fold", "split"]


@torch.inference_mode()
def predict_store(model: torch.nn.Module, spec: ModelSpec, store: FaceStore, indices, *,
                  device: str = "cpu", batch_size: int = 256, progress: ProgressFn | None = None) -> pd.DataFrame:
    """Run a model over store rows; returns one row per face with its labels and predictions."""
    encoding = spec.build_encoding()
    model = model.to(device).eval()
    rows: list[pd.DataFrame] = []
    batches = Batches(store, indices, batch_size)
    for done, batch in enumerate(batches, 1):
        x = to_input(batch.images, spec.input_size, spec.mean, spec.std, device=device)
        out = model(x)
        age, female = decode(out, encoding)
        part = {"index": batch.index.numpy(), "age_pred": age.cpu().numpy()}
        if female is not None:
            prob = female.cpu().numpy()
            part["female_prob"] = prob
            part["gender_pred"] = (prob >= 0.5).astype(int)
        if encoding.support == "groups":
            part["group_pred"] = encoding.predict_group(out["age"]).cpu().numpy()
        rows.append(pd.DataFrame(part))
        if progress:
            progress("predict", done, len(batches))
    pred = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["index", "age_pred"])
    rec = store.records.iloc[pred["index"].to_numpy()].reset_index(drop=True)
    return pd.concat([pred.reset_index(drop=True), rec[LABEL_COLUMNS]], axis=1)
