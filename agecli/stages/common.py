"""What the train and distill stages share: one prelude and one epilogue around `fit`.

Prelude: labelled rows and the minimum number of faces, the input-size check, the output
folder's name (a new one, or the one `--resume` continues), the seeded model with its
optional `--init` weights, and the self-describing `ModelSpec`.

Epilogue: best.pt scored on the test split, its metrics written into best.pt's own spec and
into metrics.json, whose schema both stages share:

    {"val":  {...},        # best.pt's epoch on the validation split ("split", "epoch", "mae", ...)
     "test": {...} | null, # best.pt on the test split (null when the run has none)
     ...}                  # a stage's own keys (distill: "teacher", "agreement_mae", "speed", "parameters")
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from agecli.engine import distributed
from agecli.engine.inference import predict_store
from agecli.errors import AgecliError
from agecli.modeling.backbones import BACKBONES, AgeModel, build_model
from agecli.modeling.checkpoint import (ModelSpec, Seen, load_checkpoint, load_state, load_torch_file, read_seen,
                                       save_checkpoint, sniff)
from agecli.modeling.encodings import Encoding
from agecli.modeling.zoo import resolve_model_ref
from agecli.options import DistillOptions, TrainOptions
from agecli.progress import ProgressFn, log
from agecli.rundir import Stage, check_name, json_default, unique_name, write_json
from agecli.store import FaceStore, face_keys

MIN_TRAIN_FACES = 16  # fewer training faces than this is a mistake, not an experiment
MIN_INPUT_SIZE = 16   # smaller inputs leave the backbones' strided stages nothing to see


# --------------------------------------------------------------------------- prelude
def labelled(store: FaceStore, indices) -> np.ndarray:
    """The rows of `indices` whose age is known."""
    indices = np.asarray(indices, dtype=np.int64)
    ages = store.records["age"].to_numpy()
    return indices[~np.isnan(ages[indices])]


def split_counts(store: FaceStore) -> str:
    """Labelled faces per split, for error messages: "test: 60, train: 150, val: 30"."""
    counts = store.records.groupby("split")["age"].count().to_dict()
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"


def require_faces(count: int, run: Path, store: FaceStore, what: str = "labelled training faces") -> None:
    if count < MIN_TRAIN_FACES:
        raise AgecliError(f"run {run} has only {count} {what} (at least {MIN_TRAIN_FACES} needed; labelled "
                          f"faces per split: {split_counts(store)}). Prepare more faces"
                          f"{' (drop --limit)' if (store.manifest.get('args') or {}).get('limit') else ''}.")


def input_size(size: int | None, store: FaceStore, arch: str) -> int:
    """The model's input side: `size`, by default the backbone's own, never above the stored faces."""
    spec = BACKBONES[arch]
    smallest = max(MIN_INPUT_SIZE, spec.min_size)
    if size is not None and size < smallest:
        raise AgecliError(f"--size {size} is too small: {arch} takes at least {smallest} px (its default is "
                          f"{spec.default_size}); leave --size out for the default.")
    size = size or min(store.size, spec.default_size)
    if size > store.size:
        raise AgecliError(f"--size {size} is larger than the run's {store.size}px faces; use --size {store.size} "
                          "or less, or re-prepare with a larger --size.")
    return size


def output_name(parent: Path, base: str, resume: bool, world: distributed.World) -> str:
    """The folder under `parent` to write: `base` itself when resuming it, else the first free
    one of base, base2, ... (chosen by rank 0 under torchrun). `base` must be a plain name."""
    base = check_name(base)
    if resume:
        if not (parent / base / "last.pt").exists():
            if (parent / base).is_dir():   # started, but stopped before its first epoch ended
                raise AgecliError(f"--resume: {parent / base} stopped before its first epoch ended, so it has no "
                                  "last.pt to resume; run the command without --resume (it starts again in a new "
                                  f"folder), or delete {parent / base} first to keep the name.")
            runs = sorted(p.name for p in parent.glob("*")) if parent.is_dir() else "none"
            raise AgecliError(f"--resume: {parent / base / 'last.pt'} does not exist; nothing to resume "
                              f"(runs here: {runs}).")
        return base
    name = distributed.broadcast(unique_name(parent, base) if world.main else None, world)
    if name != base and world.main:   # said up front: the folder the user named is not the one written
        log(f"{parent / base} already exists; this one goes to {parent / name} (--resume continues {base}, "
            "--name picks another).")
    return name


def seeded_model(arch: str, encoding: Encoding, *, gender: bool, pretrained: str | None, init: str | Path | None,
                 seed: int) -> tuple[AgeModel, dict[str, Any] | None]:
    """The model to train (the same seed builds the same initial head), started from `init`'s
    weights when given; returns it with what `load_init` reports."""
    torch.manual_seed(seed)
    model = build_model(arch, encoding, gender=gender, pretrained=pretrained)
    return model, (load_init(model, init) if init else None)


def load_init(model: AgeModel, path: str | Path) -> dict[str, Any]:
    """Start from an agecli checkpoint or a plain state dict; heads that differ are left as built."""
    path = Path(path)
    state, source = _init_state(path)
    own = model.state_dict()
    if not any(k in own for k in state):  # a bare torchvision state dict: keys lack "backbone."
        prefixed = {f"backbone.{k}": v for k, v in state.items()}
        if any(k in own for k in prefixed):
            state = prefixed
    skipped = load_state(model, state, source=f"--init {path}", strict=False)
    loaded = [k for k in state if k in own and k not in skipped]
    backbone_keys = [k for k in own if k.startswith("backbone.")]
    backbone_loaded = sum(1 for k in loaded if k.startswith("backbone."))
    if backbone_loaded < 0.5 * len(backbone_keys):
        shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in skipped if k in own][:3]
        raise AgecliError(
            f"--init {path} does not fit {model.__class__.__name__} with this --arch: only {backbone_loaded} of "
            f"{len(backbone_keys)} backbone tensors match"
            + (" (e.g. " + "; ".join(shape) + ")" if shape else "") + ". Use the same --arch the weights were trained with.")
    return {"init": str(path), "kind": source, "loaded": len(loaded), "skipped": skipped}


def _init_state(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of an `--init` file, and what kind of file it was."""
    if not path.exists():
        raise AgecliError(f"--init {path} does not exist.")
    kind = sniff(path)
    if kind != "torch":
        raise AgecliError(f"--init {path} is not a PyTorch file: it looks like {kind}. "
                          "Give an agecli checkpoint or a state dict saved with torch.save.")
    payload = load_torch_file(path, label=f"--init {path}")
    if isinstance(payload, dict) and payload.get("format") == "agecli.checkpoint":
        return payload["state_dict"], "agecli checkpoint"
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        return payload["state_dict"], "state dict"
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        return payload["model"], "state dict"
    if isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload, "state dict"
    raise AgecliError(f"--init {path} is neither an agecli checkpoint nor a state dict of tensors.")


def model_spec(stage: str, store: FaceStore, run: Path, name: str, *, arch: str, encoding: Encoding, size: int,
               gender: bool, mean, std, fingerprint: str, args: dict[str, Any],
               init_info: dict[str, Any] | None, **provenance: Any) -> ModelSpec:
    """The ModelSpec of a model trained on `store`; `provenance` adds the stage's own keys
    (distill: method, loss, teachers) to the stage, run, name, dataset, args and init."""
    return ModelSpec(
        arch=arch, encoding=encoding.to_dict(), input_size=size, gender=gender, mean=mean, std=std,
        alignment=store.manifest.get("alignment") or store.alignment.to_dict(),
        label_space=store.manifest.get("label_space", "ages 0-100"), data_fingerprint=fingerprint,
        provenance={"stage": stage, "run": str(run), "name": name, "dataset": store.dataset, **provenance,
                    "args": args, "init": init_info and {k: v for k, v in init_info.items() if k != "skipped"}})


class _Unrecorded:
    """Stands in for the Stage on ranks > 0 under torchrun: only rank 0 writes the manifest."""

    def set(self, **fields: Any) -> None:
        pass

    def complete(self, results: dict[str, Any] | None = None, files: list[str] | None = None) -> None:
        pass


# what --resume may change: where and how fast the run goes, and how long it lasts (a longer
# --epochs extends it); every other option is the run's own and is restored from last.pt
RESUME_MAY_CHANGE = {"resume", "device", "threads", "workers", "val_batch_size", "compile", "amp", "channels_last",
                     "time_limit", "epochs", "patience", "precise_bn_batches"}


# the options objects a run's args record: a field a later agecli added is missing from an
# older run's record, where it had, in effect, its default (the behaviour before it existed)
RECORDED_OPTIONS = {"options": TrainOptions, "config": DistillOptions}


def check_resume(run: Path, kind: str, name: str, args: dict[str, Any]) -> None:
    """Refuse a --resume whose options would change what the run trains: they were not applied
    (the optimiser, schedule and sampler come back from last.pt) yet would be recorded as used."""
    manifest = run / kind / name / "manifest.json"
    if not (args.get("options") or {}).get("resume") or not manifest.exists():
        return
    before = json.loads(manifest.read_text()).get("args") or {}
    now = json.loads(json.dumps(args, default=json_default))
    changed = [f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(before) | set(now))
               if key not in RECORDED_OPTIONS and before.get(key) != now.get(key)]
    for key, cls in RECORDED_OPTIONS.items():
        old, new = before.get(key) or {}, now.get(key) or {}
        defaults = json.loads(json.dumps(cls().to_dict(), default=json_default))
        changed += [f"--{field.replace('_', '-')} {old.get(field, defaults.get(field))!r} -> {new.get(field)!r}"
                    for field in sorted(set(old) | set(new))
                    if not (key == "options" and field in RESUME_MAY_CHANGE)
                    and old.get(field, defaults.get(field)) != new.get(field)]
    if changed:
        raise AgecliError(f"--resume continues {run / kind / name} as it was started, but these differ from its "
                          f"start: {'; '.join(changed)}. Give them as they were to resume (only where and how "
                          "long it runs may change), or train a new model under another --name.")


@contextlib.contextmanager
def open_stage(world: distributed.World, run: Path, kind: str, name: str, args: dict[str, Any],
               inputs: dict[str, Any], reads: Sequence[str | Path | None] = ()) -> Iterator[Stage | _Unrecorded]:
    """The stage's manifest (rank 0), or a stand-in that records nothing (other ranks).
    `reads`: the runs and model files the stage learns from (see `Stage`)."""
    check_resume(run, kind, name, args)
    if not world.main:
        yield _Unrecorded()
        return
    with Stage(run, kind, name, args=args, inputs=inputs, reads=reads) as stage:
        yield stage


# --------------------------------------------------------------------------- epilogue
def load_best(out_dir: Path, options: TrainOptions) -> tuple[AgeModel, ModelSpec, str]:
    """best.pt on the training device: (model, spec, device)."""
    device = distributed.setup(options.device)[1]
    model, spec = load_checkpoint(Path(out_dir) / "best.pt", device)
    return model, spec, device


def predict_rows(model: AgeModel, spec: ModelSpec, store: FaceStore, rows, device: str, options: TrainOptions,
                 progress: ProgressFn | None) -> pd.DataFrame:
    return predict_store(model, spec, store, rows, device=device, batch_size=options.val_batch_size,
                         progress=progress)


def update_best(out_dir: Path, model: AgeModel, spec: ModelSpec, metrics: dict[str, Any], seen: Seen | None) -> None:
    """Add final `metrics` (test scores, ...) to best.pt's spec, so the file tells how good it is;
    `seen` (what it learned from) stays with it."""
    spec.metrics = {**spec.metrics, **metrics}
    save_checkpoint(Path(out_dir) / "best.pt", model, spec, seen=seen)


def learned_from(store, image_rows, label_rows, *models: str | Path | None) -> Seen:
    """What a model trained on `store` learns from: the images of `image_rows`, the labels of
    `label_rows`, and all that `models` (its teachers, its initial weights) learned from."""
    seen = Seen.of(face_keys(store.records, image_rows), face_keys(store.records, label_rows))
    return seen.union(*(read_seen(resolve_model_ref(m)) for m in models if m))


def write_metrics(out_dir: Path, val: dict[str, Any], test: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    """metrics.json in the shared schema (see the module's docstring)."""
    metrics = {"val": val, "test": test, **extra}
    write_json(Path(out_dir) / "metrics.json", metrics)
    return metrics
