"""The train stage: one model trained on a prepared run (`agecli train`).

    train(run, arch=..., encoding=..., options=TrainOptions(...))
        builds the model and its ModelSpec from the run's face store, fits it with the shared
        loop (agecli.engine.loop.fit) in RUN/train/<name>/ and scores best.pt on the test split.

    cross_validate(run, arch=..., ...)
        one model per official fold (Adience), per-fold and mean +- std metrics.

Distributed data parallel comes for free under `torchrun` (see agecli.engine.distributed).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agecli.engine import distributed
from agecli.engine.loop import fit
from agecli.engine.metrics import score
from agecli.errors import AgecliError
from agecli.modeling.backbones import count_parameters, default_normalisation, resolve_arch
from agecli.modeling.checkpoint import Seen
from agecli.modeling.encodings import build_encoding
from agecli.options import TrainOptions
from agecli.progress import ProgressFn, log
from agecli.rundir import Stage, resolve_run, unique_name, write_csv, write_json
from agecli.stages.common import (input_size, labelled, learned_from, load_best, model_spec, open_stage, output_name,
                                  predict_rows, require_faces, seeded_model, split_counts, update_best, write_metrics)
from agecli.store import FaceStore, labelled_subset


def train(run: str | Path | None = None, *, arch: str, name: str | None = None, size: int | None = None,
          encoding: str = "ldae", sigma: float | None = None, decode: str | None = None, loss: str | None = None,
          gender: bool = False, pretrained: str | None = None, init: str | Path | None = None,
          fold: int | None = None, options: TrainOptions | None = None,
          progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train one model on a prepared run; writes RUN/train/<name>/ and returns its results."""
    options = options or TrainOptions()
    world = distributed.from_env()
    run = resolve_run(run)
    store = FaceStore.open(run)
    arch = _check_run(store, run, arch, gender)
    train_idx, counts = _training_rows(store, run, fold, options.labelled_fraction)
    val_idx, test_idx = (labelled(store, store.indices(split, fold)) for split in ("val", "test"))
    if len(val_idx) == 0:
        raise AgecliError(f"run {run} has no labelled validation faces (labelled faces per split: "
                          f"{split_counts(store)}); best.pt and early stopping need them. "
                          "Re-run prepare with a validation fraction (--val-fraction).")
    enc_options = {k: v for k, v in (("sigma", sigma), ("decode", decode), ("loss_kind", loss)) if v is not None}
    enc = build_encoding(encoding, **enc_options)
    size = input_size(size, store, arch)
    name = output_name(run / "train", name or (arch if fold is None else f"{arch}-fold{fold}"), options.resume, world)
    mean, std = default_normalisation(arch)  # what the backbone's pretrained weights expect
    model, init_info = seeded_model(arch, enc, gender=gender, pretrained=pretrained, init=init, seed=options.seed)
    args = {"arch": arch, "name": name, "size": size, "encoding": enc.to_dict(), "gender": gender,
            "pretrained": pretrained, "init": str(init) if init else None, "fold": fold, "options": options.to_dict()}
    spec = model_spec("train", store, run, name, arch=arch, encoding=enc, size=size, gender=gender, mean=mean,
                      std=std, fingerprint=store.fingerprint(), args=args, init_info=init_info)
    out_dir = run / "train" / name
    with open_stage(world, run, "train", name, args, {"prepare": spec.data_fingerprint},
                    reads=[run, init, pretrained]) as stage:
        seen = learned_from(store, train_idx, train_idx, init)
        results = fit(model, spec, store, train_idx, val_idx, out_dir, options, progress=progress, seen=seen)
        results.update({"run": str(run), "name": name, "dir": str(out_dir), "arch": arch, "input_size": size,
                        "encoding": enc.to_dict(), "parameters": count_parameters(model), "init": init_info,
                        **counts})
        if world.main:
            results["test"] = _score_on_test(out_dir, store, test_idx, options, progress, seen)
            write_metrics(out_dir, results["val"], results["test"])
            stage.complete(results={k: v for k, v in results.items() if k != "init"})
    return results


def _training_rows(store: FaceStore, run: Path, fold: int | None, fraction: float) -> tuple[np.ndarray, dict[str, Any]]:
    """The labelled training rows whose labels `fraction` keeps (`agecli.store.labelled_subset`; train
    does not use the others), with their counts for the results."""
    every = labelled(store, store.indices("train", fold))
    rows = labelled_subset(store, every, fraction)
    what = ("labelled training faces" + ("" if fold is None else f" outside fold {fold}")
            + ("" if fraction >= 1 else f" at --labelled-fraction {fraction:g}"))
    require_faces(len(rows), run, store, what)
    return rows, {"labelled_fraction": fraction, "labelled_faces": int(len(rows)),
                  "unlabelled_faces": int(len(every) - len(rows))}


def _check_run(store: FaceStore, run: Path, arch: str, gender: bool) -> str:
    """Refuse a run without age labels, an unknown arch or a gender head without gender labels;
    returns the arch's full name."""
    if not store.has_ages:
        raise AgecliError(f"run {run} has no age labels (dataset {store.dataset!r}, e.g. a `folder` run): there is "
                          "nothing to train on. Prepare a labelled dataset (utkface, adience, ...) or use "
                          "`agecli distill`, which teaches a student on unlabelled faces from a teacher.")
    arch = resolve_arch(arch)
    if gender and not (store.records["gender"] >= 0).any():
        raise AgecliError(f"--gender asks for a gender head but run {run} has no gender labels; drop --gender.")
    return arch


def _score_on_test(out_dir: Path, store: FaceStore, test_idx, options: TrainOptions,
                   progress: ProgressFn | None, seen: Seen) -> dict[str, Any] | None:
    """best.pt's test metrics (None without a test split), also written into its spec with the
    faces it learned from, and the predictions in test_predictions.csv."""
    model, spec, device = load_best(out_dir, options)
    metrics = None
    if len(test_idx):
        frame = predict_rows(model, spec, store, test_idx, device, options, progress)
        metrics = score(frame)
        write_csv(out_dir / "test_predictions.csv", frame)
    update_best(out_dir, model, spec, {"test": metrics} if metrics else {}, seen)
    return metrics


RUNTIME_ONLY = {"resume", "device", "threads", "workers", "val_batch_size"}   # where it runs, not what it trains


def _same_fold(run: Path, name: str, arch: str, fold: int, kwargs: dict[str, Any]) -> bool:
    """Whether RUN/train/NAME was started, on the run's faces as they are, with the settings this
    cross-validation gives its fold."""
    try:
        manifest = json.loads((run / "train" / name / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    args = manifest.get("args") or {}
    if (manifest.get("inputs") or {}).get("prepare") != FaceStore.open(run).fingerprint():
        return False
    options = json.loads(json.dumps((kwargs.get("options") or TrainOptions()).to_dict(), default=str))
    encoding = args.get("encoding") or {}
    wanted = {"arch": arch, "fold": fold, "gender": kwargs.get("gender", False), "pretrained": kwargs.get("pretrained"),
              "init": str(kwargs["init"]) if kwargs.get("init") else None}
    return (all(args.get(k) == v for k, v in wanted.items())
            and kwargs.get("size") in (None, args.get("size"))
            and encoding.get("name") == kwargs.get("encoding", "ldae")
            and all(kwargs.get(key) in (None, encoding.get(field))
                    for key, field in (("sigma", "sigma"), ("decode", "decode"), ("loss", "loss_kind")))
            and {k: v for k, v in (args.get("options") or {}).items() if k not in RUNTIME_ONLY}
            == {k: v for k, v in options.items() if k not in RUNTIME_ONLY})


def _finished_fold(run: Path, name: str, arch: str, fold: int, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The results of a fold model an earlier, interrupted cross-validation finished with these
    settings: kept rather than trained again (under NAME2)."""
    try:
        manifest = json.loads((run / "train" / name / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("status") != "complete" or not _same_fold(run, name, arch, fold, kwargs):
        return None
    log(f"{run / 'train' / name}: finished before with these settings; kept")
    return manifest.get("results") or {}


def cross_validate(run: str | Path | None = None, *, arch: str, name: str | None = None,
                   folds: list[int] | None = None, progress: ProgressFn | None = None,
                   **kwargs: Any) -> dict[str, Any]:
    """One model per cross-validation fold (Adience's 5 official folds): per-fold and mean +- std metrics.
    Run again after an interruption, it keeps the folds finished with the same settings and
    resumes an unfinished one from its last.pt."""
    run = resolve_run(run)
    store = FaceStore.open(run)
    available = store.folds()
    folds = folds if folds is not None else available
    if len(available) < 2:
        raise AgecliError(f"run {run} has no cross-validation folds (dataset {store.dataset!r}); --cv needs a "
                          "dataset with official folds such as adience. Train without --cv.")
    missing = sorted(set(folds) - set(available))
    if missing:
        raise AgecliError(f"folds {missing} are not in run {run} (its folds: {available}).")
    arch = resolve_arch(arch)
    base = name or arch
    per_fold = []
    for fold in folds:
        fold_name = f"{base}-fold{fold}"
        result = _finished_fold(run, fold_name, arch, fold, kwargs)
        if result is None:
            resume = (run / "train" / fold_name / "last.pt").is_file() and _same_fold(run, fold_name, arch, fold, kwargs)
            options = replace(kwargs.get("options") or TrainOptions(), resume=resume)
            result = train(run, arch=arch, name=fold_name, fold=fold, progress=progress, **{**kwargs, "options": options})
        per_fold.append({"fold": fold, "name": result["name"], **(result.get("test") or {})})
    frame = pd.DataFrame(per_fold)
    summary: dict[str, Any] = {"folds": per_fold}
    for key in ("group_exact", "group_1off", "mae", "gender_accuracy"):
        if key in frame:
            values = frame[key].dropna().to_numpy(dtype=float)
            if len(values):
                summary[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    if distributed.from_env().main:
        cv_name = unique_name(run / "train", f"{base}-cv")
        with Stage(run, "train", cv_name, args={"arch": arch, "folds": folds, **{k: str(v) for k, v in kwargs.items()}},
                   reads=[run, kwargs.get("init"), kwargs.get("pretrained")]) as stage:
            write_csv(stage.path("folds.csv"), frame)
            write_json(stage.path("cv.json"), summary)
            stage.complete(results=summary)
        summary["dir"] = str(stage.dir)
    return summary
