"""Running a model over a face store: one row of predictions per face, with its labels.

    predict_store(model, spec, store, indices)  -> DataFrame (index, age_pred, [female_prob,
                                                   gender_pred, group_pred], path, age, ...)

`mirror=True` scores every face as the mean of the model's answers on it and on its mirror
image (test-time flipping): steadier, at twice the cost.
"""

from __future__ import annotations

import pandas as pd
import torch

from agecli.data.batches import Batches, to_input
from agecli.modeling.checkpoint import ModelSpec
from agecli.modeling.decode import decode
from agecli.modeling.encodings import Encoding
from agecli.progress import ProgressFn
from agecli.store import FaceStore

LABEL_COLUMNS = ["path", "age", "age_std", "gender", "race", "group", "fold", "split"]


@torch.inference_mode()
def predict_store(model: torch.nn.Module, spec: ModelSpec, store: FaceStore, indices, *,
                  device: str = "cpu", batch_size: int = 256, mirror: bool = False,
                  progress: ProgressFn | None = None) -> pd.DataFrame:
    """Run a model over store rows; returns one row per face with its labels and predictions."""
    encoding = spec.build_encoding()
    model = model.to(device).eval()
    rows: list[pd.DataFrame] = []
    batches = Batches(store, indices, batch_size)
    for done, batch in enumerate(batches, 1):
        x = to_input(batch.images, spec.input_size, spec.mean, spec.std, device=device)
        outputs = [model(x), model(x.flip(-1))] if mirror else [model(x)]
        age, female, group = _answers(outputs, encoding)
        part = {"index": batch.index.numpy(), "age_pred": age.cpu().numpy()}
        if female is not None:
            prob = female.cpu().numpy()
            part["female_prob"] = prob
            part["gender_pred"] = (prob >= 0.5).astype(int)
        if group is not None:
            part["group_pred"] = group.cpu().numpy()
        rows.append(pd.DataFrame(part))
        if progress:
            progress("predict", done, len(batches))
    pred = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["index", "age_pred"])
    rec = store.records.iloc[pred["index"].to_numpy()].reset_index(drop=True)
    return pd.concat([pred.reset_index(drop=True), rec[LABEL_COLUMNS]], axis=1)


def _answers(outputs: list[dict[str, torch.Tensor]], encoding: Encoding
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(age, P(female) or None, age group or None) per face: the mean over several outputs for
    the same faces (an image and its mirror); an age group is the likeliest of the summed probabilities."""
    decoded = [decode(out, encoding) for out in outputs]
    age = torch.stack([a for a, _ in decoded]).mean(0)
    female = None if decoded[0][1] is None else torch.stack([f for _, f in decoded]).mean(0)
    group = None
    if encoding.support == "groups":
        probs = sum(torch.softmax(out["age"].float(), 1) for out in outputs)
        group = encoding.predict_group(probs)
        age = encoding.predict(probs)  # the group's midpoint, not a mean of two midpoints
    return age, female, group
