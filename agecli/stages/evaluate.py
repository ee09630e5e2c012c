"""The eval stage: score a checkpoint on a split of a run (`agecli eval`).

    evaluate(model_path, run, split="test")  -> metrics, warnings; RUN/eval/<name>/
    breakdown(frame)                         -> MAE per age decade and per gender / race

Prediction and the metrics themselves are the engine's (agecli.engine.inference.predict_store,
agecli.engine.metrics.score), shared with training and bench.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agecli.engine.inference import predict_store
from agecli.engine.metrics import score
from agecli.errors import AgecliError
from agecli.labels import GENDER_NAMES, group_of_age
from agecli.modeling.checkpoint import load_checkpoint, read_seen
from agecli.modeling.zoo import resolve_checkpoint
from agecli.device import require_device
from agecli.progress import log
from agecli.rundir import Stage, check_name, resolve_run, write_csv, write_json
from agecli.store import SPLITS, FaceStore, face_keys

RACE_NAMES = {0: "white", 1: "black", 2: "asian", 3: "indian", 4: "other"}


def breakdown(frame: pd.DataFrame) -> pd.DataFrame:
    """MAE per age decade, per gender and per race: the bias table."""
    frame = frame[frame["age"].notna()].copy()
    frame["abs_err"] = (frame["age_pred"] - frame["age"]).abs()
    frame["decade"] = (frame["age"] // 10 * 10).astype(int)
    parts = []
    for column, label, name in (("decade", "age", lambda d: f"{d}-{d + 9}"),
                                ("gender", "gender", lambda g: GENDER_NAMES.get(g, "unknown")),
                                ("race", "race", lambda r: RACE_NAMES.get(r, "unknown"))):
        # grouped on the numeric code, so decades sort 0-9, 10-19, ..., 100-109
        grouped = frame.groupby(column)["abs_err"].agg(["count", "mean"]).reset_index()
        grouped.columns = ["value", "n", "mae"]
        grouped["value"] = grouped["value"].map(name)
        grouped.insert(0, "by", label)
        parts.append(grouped)
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------- the eval stage
def alignment_differences(model_alignment: dict[str, Any], run_alignment: dict[str, Any]) -> list[str]:
    """Settings (method, size, margin, template) on which a checkpoint and a run disagree.

    A model sees faces as they were cut out for its training; a run aligned differently
    (another template or margin) shifts its errors, so eval warns. The crop size alone is
    harmless: faces are resized to the model's input size.
    """
    diffs = []
    for key in ("method", "template", "margin"):
        a, b = model_alignment.get(key), run_alignment.get(key)
        if a is not None and b is not None and a != b:
            diffs.append(f"{key}: model {a!r} vs run {b!r}")
    return diffs


def _seen_warning(model_file: Path, store: FaceStore, indices: np.ndarray, split: str) -> list[str]:
    """Faces scored that the model (or its teachers) learned from, as its checkpoint records
    them: prepared again with another seed or a larger dataset, a run's test split can hold
    training faces of a model from another run, and its score is then not a held-out one."""
    seen = read_seen(model_file)
    count = seen.count(face_keys(store.records, indices)) if seen is not None else 0
    if not count:
        return []
    return [f"{count} of the {len(indices)} faces scored ({split}) are faces this model or its teachers learned "
            "from (the checkpoint records them by image content), so this score is optimistic. Score it on faces "
            "it never saw: a run prepared from other images, or with the split (and fold) it was trained on."]


def _say_replaced(folder: Path, model_path) -> None:
    """Evaluating again under a name that holds another model's eval replaces it: said, as
    train and distill say when a name is taken."""
    try:
        before = json.loads((folder / "manifest.json").read_text()).get("args", {}).get("model")
    except (OSError, ValueError, AttributeError):
        return
    if before and Path(before).resolve() != Path(str(model_path)).resolve():
        log(f"{folder} held an eval of {before}; it is replaced by this one of {model_path} (give another --name to keep both).")


def _model_name(model_path) -> str:
    path = Path(model_path)
    return f"{path.parent.name}-{path.stem}" if path.stem in ("best", "last") else path.stem


def evaluate(model_path, run=None, split: str = "test", *, device: str = "auto", batch_size: int = 256,
             name: str | None = None, mirror: bool = False, progress=None) -> dict[str, Any]:
    """Score a checkpoint on a split of a run (`all` = every labelled face): the `agecli eval` stage.

    Writes RUN/eval/<name>/predictions.csv, metrics.json and bias.csv under a stage manifest;
    returns {"metrics", "warnings", "dir", ...}. Cross-dataset use is fine: the checkpoint's
    alignment is compared with the run's and differences come back as warnings.

    Label spaces: an age model on an Adience (groups) run is scored on the groups (its ages
    mapped to the nearest group) as well as by MAE against group midpoints; a `groups` model
    on an ages run is scored on the groups of the true ages (exact / 1-off), and its MAE
    (group midpoints vs true ages) is reported with a warning.

    `mirror`: each face is scored as the mean of the answers on it and on its mirror image
    (the default name then ends in -mirror), what a teacher gives under `--teacher-mirror`.
    """
    if batch_size < 1:
        raise AgecliError(f"--batch-size {batch_size}: give 1 or more faces per forward pass (e.g. 256).")
    if split not in (*SPLITS, "all"):
        raise AgecliError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} or all.")
    suffix = ("" if split == "test" else f"-{split}") + ("-mirror" if mirror else "")
    name = check_name(name or _model_name(model_path) + suffix,
                      "--name" if name else "the eval folder name (from the model path; pass --name)")
    device = require_device(device)
    run = resolve_run(run)
    Stage(run, "eval", name).check()  # a folder that is not agecli's, or in use: said before predicting
    _say_replaced(run / "eval" / name, model_path)
    store = FaceStore.open(run)
    model_file = resolve_checkpoint(model_path)
    model, spec = load_checkpoint(model_file, device)
    rec = store.records
    has_groups = bool((rec["group"] >= 0).any())
    if not store.has_ages and not has_groups:
        raise AgecliError(f"run {run} has no age or group labels (dataset {store.dataset!r}): there is nothing to "
                          f"score against. Use `agecli predict --model {model_path}` to label its faces instead.")
    if split == "all":
        indices = store.indices("labelled")
    else:
        indices = store.indices(split)
        indices = indices[~np.isnan(rec["age"].to_numpy()[indices])]
    if len(indices) == 0:
        counts = rec[rec["age"].notna()].groupby("split").size().to_dict()
        raise AgecliError(f"split {split!r} of run {run} has no labelled faces (labelled per split: {counts or 'none'}); "
                          "choose another --split, or --split all for a run prepared from a separate test set.")
    warnings: list[str] = []
    diffs = alignment_differences(spec.alignment, store.alignment.to_dict())
    if diffs:
        warnings.append(f"the model was trained on faces aligned differently from run {run} ({'; '.join(diffs)}); "
                        "errors may be inflated. Re-prepare the run with the model's alignment for a fair score.")
    warnings += _seen_warning(model_file, store, indices, split)
    if store.size < spec.input_size:
        warnings.append(f"run {run} stores {store.size}px faces but the model expects {spec.input_size}px; "
                        "faces are upsampled.")
    frame = predict_store(model, spec, store, indices, device=device, batch_size=batch_size, mirror=mirror,
                          progress=progress)
    groups_model = spec.build_encoding().support == "groups"
    if groups_model and not has_groups:
        frame["group"] = frame["age"].map(lambda a: group_of_age(float(a)))
        warnings.append("a groups model on an ages run: exact/1-off use the groups of the true ages; its MAE "
                        "compares group midpoints with exact ages.")
    metrics = score(frame)
    bias = breakdown(frame)
    args = {"model": str(model_path), "split": split, "device": device, "batch_size": batch_size,
            **({"mirror": True} if mirror else {})}  # older evals' arguments stay as they were
    with Stage(run, "eval", name, args=args,
               inputs={"model_fingerprint": spec.data_fingerprint, "arch": spec.arch},
               reads=[run, model_file]) as stage:
        write_csv(stage.path("predictions.csv"), frame)
        write_csv(stage.path("bias.csv"), bias)
        result = {"model": str(model_path), "run": str(run), "split": split, "arch": spec.arch,
                  "encoding": spec.encoding.get("name"), "input_size": spec.input_size, "mirror": mirror,
                  "metrics": metrics,
                  "warnings": warnings, "dir": str(stage.dir), "trained_on": spec.provenance.get("dataset"),
                  "cross_dataset": spec.data_fingerprint != store.fingerprint()}
        write_json(stage.path("metrics.json"), {**metrics, "bias": bias.to_dict(orient="records")})
        stage.complete(results=result)
    result["bias"] = bias.to_dict(orient="records")
    return result
