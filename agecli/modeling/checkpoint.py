"""Self-describing model files.

A checkpoint is one `torch.save`d dict of tensors and plain data (it loads with
`weights_only=True`, so a file from elsewhere cannot run code):

    {"format": "agecli.checkpoint", "format_version": 1,
     "spec": ModelSpec as a dict,       # everything needed to rebuild and feed the model
     "state_dict": {...},
     "training_state": {...},           # optional: optimizer/scheduler/epoch, for --resume
     "seen_faces": int64 tensor,        # optional (`Seen`): keys of the images it learned from,
     "seen_labels": int64 tensor}       # and of those whose labels it learned (agecli.store.face_keys)

`--teacher t.pt`, eval, bench, export and predict need nothing but the file.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agecli import FORMAT_VERSION, __version__
from agecli.modeling.encodings import Encoding, build_encoding
from agecli.errors import AgecliError
from agecli.modeling.backbones import IMAGENET_MEAN, IMAGENET_STD, AgeModel, build_model, resolve_arch
from agecli.options import MAX_MARGIN, MAX_SIZE, MIN_SIZE
from agecli.rundir import atomic_path

CHECKPOINT_FORMAT = "agecli.checkpoint"


@dataclass
class ModelSpec:
    arch: str
    encoding: dict[str, Any]
    input_size: int
    gender: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    alignment: dict[str, Any] = field(default_factory=dict)   # agecli.store.Alignment as a dict
    label_space: str = "ages 0-100"
    data_fingerprint: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # stage, run, args, teachers, method
    agecli_version: str = __version__
    created: str = ""

    def build_encoding(self) -> Encoding:
        return build_encoding(self.encoding)

    def build_model(self) -> AgeModel:
        return build_model(self.arch, self.build_encoding(), gender=self.gender)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the model file") -> "ModelSpec":
        """The spec a model file carries, its values checked first (`check_spec`)."""
        check_spec(data, source)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["mean"], known["std"] = tuple(known.get("mean", IMAGENET_MEAN)), tuple(known.get("std", IMAGENET_STD))
        return cls(**known)


def check_spec(data: Any, source: str) -> None:
    """Refuse a spec whose values are of the wrong kind or out of bounds before anything is
    built from them: a model file may come from anyone, and `input_size: 30000` alone would
    make every face a 10 GB tensor."""
    def bad(what: str) -> AgecliError:
        return AgecliError(f"{source} is not a usable agecli model: its spec has {what}. It was damaged or not "
                           "written by agecli; use a checkpoint written by `agecli train` or `agecli distill`.")

    if not isinstance(data, dict):
        raise bad(f"a {type(data).__name__} instead of a mapping")
    if not isinstance(data.get("arch"), str) or not isinstance(data.get("encoding"), dict):
        raise bad("no architecture name or encoding")
    if not _whole(data.get("input_size"), MIN_SIZE, MAX_SIZE):
        raise bad(f"input_size {data.get('input_size')!r} (agecli models take {MIN_SIZE}..{MAX_SIZE} px)")
    for key, positive in (("mean", False), ("std", True)):
        values = data.get(key, IMAGENET_MEAN)
        if not (isinstance(values, (list, tuple)) and len(values) == 3
                and all(isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not positive) for v in values)):
            raise bad(f"{key} {values!r} (three finite numbers{', above 0' if positive else ''})")
    alignment = data.get("alignment", {})
    if not isinstance(alignment, dict):
        raise bad(f"alignment {alignment!r}")
    if "size" in alignment and not _whole(alignment["size"], MIN_SIZE, MAX_SIZE):
        raise bad(f"alignment size {alignment['size']!r} ({MIN_SIZE}..{MAX_SIZE} px)")
    margin = alignment.get("margin", 0.0)
    if not (isinstance(margin, (int, float)) and 0 <= margin <= MAX_MARGIN):
        raise bad(f"alignment margin {margin!r} (0..{MAX_MARGIN})")
    if alignment.get("method", "similarity") not in ("similarity", "resize"):
        raise bad(f"alignment method {alignment.get('method')!r}")


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


@dataclass(frozen=True)
class Seen:
    """What a model learned from, by image content (`agecli.store.face_keys`): `faces`, every
    image it saw (its training faces, and its teachers' and initial weights' faces), and
    `labels`, those whose labels it learned. Scoring it on any of `faces` is not a held-out
    score; a student whose labels are hidden should not get them through `labels`."""

    faces: np.ndarray
    labels: np.ndarray

    @classmethod
    def of(cls, faces, labels) -> "Seen":
        return cls(np.unique(np.asarray(faces, dtype=np.int64)), np.unique(np.asarray(labels, dtype=np.int64)))

    def union(self, *others: "Seen | None") -> "Seen":
        known = [self, *(o for o in others if o is not None)]
        return Seen.of(np.concatenate([k.faces for k in known]), np.concatenate([k.labels for k in known]))

    def count(self, keys: np.ndarray, labels: bool = False) -> int:
        """How many of `keys` (one per face) are among the images seen (or whose labels were)."""
        return int(np.isin(keys, self.labels if labels else self.faces).sum())


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, spec: ModelSpec,
                    training_state: dict[str, Any] | None = None, seen: Seen | None = None) -> Path:
    """Write atomically; unwraps DDP / torch.compile wrappers so the keys stay plain."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    spec.created = spec.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if training_state is not None:
        payload["training_state"] = training_state
    if seen is not None:
        payload["seen_faces"], payload["seen_labels"] = torch.from_numpy(seen.faces), torch.from_numpy(seen.labels)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_seen(path: str | os.PathLike | None) -> Seen | None:
    """What a checkpoint learned from, or None when it does not say (older files, ONNX models,
    names such as dlib-age, checkpoints from elsewhere)."""
    if path is None or not Path(path).is_file() or sniff(Path(path)) != "torch":
        return None
    try:
        payload = read_checkpoint(path)
    except AgecliError:   # a plain state dict (an --init from elsewhere): it does not say
        return None
    faces, labels = payload.get("seen_faces"), payload.get("seen_labels", payload.get("seen_faces"))
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.int64 for t in (faces, labels)):
        return None
    return Seen(faces.numpy(), labels.numpy())


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load the raw payload safely, explaining what the file is when it is not ours."""
    path = Path(path)
    if not path.exists():
        raise AgecliError(f"model file {path} does not exist.")
    kind = sniff(path)
    if kind != "torch":
        hint = (" ONNX models can be used as teachers with --teacher-spec; see `agecli distill --help`."
                if kind == "an ONNX model" else "")
        raise AgecliError(f"{path} is not an agecli checkpoint: it looks like {kind}.{hint}")
    payload = load_torch_file(path, label=str(path))
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        what = _describe_payload(payload)
        raise AgecliError(f"{path} is not an agecli checkpoint ({what}). Use it with `agecli train --init {path}` "
                          "if it is a state dict of the same architecture.")
    if payload.get("format_version") != FORMAT_VERSION:
        spec = payload.get("spec")
        maker = spec.get("agecli_version") if isinstance(spec, dict) else None
        by = f", written by agecli {maker}" if maker else ""
        newer = isinstance(payload.get("format_version"), int) and payload["format_version"] > FORMAT_VERSION
        raise AgecliError(f"{path} has checkpoint format {payload.get('format_version')}{by}; this agecli "
                          f"{__version__} reads format {FORMAT_VERSION}. "
                          + ("Upgrade agecli (pip install -U agecli) to read it." if newer else
                             "Re-train or re-export it with this agecli."))
    return payload


def load_torch_file(path: Path, *, label: str) -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain data only, so a file from
    elsewhere cannot run code. A refusal is explained in agecli's words: torch's own message
    advises turning the check off, which agecli never does."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AgecliError(f"{label} could not be loaded safely: {_load_refusal(exc)}") from None


def _load_refusal(exc: Exception) -> str:
    """Why torch refused a file, and what to give instead."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if pickled:
        return (f"it holds a pickled Python object ({pickled.group(1)}), not only tensors and plain data, and "
                "agecli loads model files with weights_only=True so that no file can run code. Save the weights "
                "alone instead: torch.save(model.state_dict(), PATH).")
    if "weights only load failed" in text.lower():
        return ("it is not a PyTorch save of tensors and plain data (agecli loads model files with "
                "weights_only=True). Give an agecli checkpoint or a state dict saved with torch.save.")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"the file is damaged or not a PyTorch save ({first}). Save or copy it again."


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[AgeModel, ModelSpec]:
    """Rebuild the model a checkpoint describes, in eval mode on `device`."""
    payload = read_checkpoint(path)
    spec = ModelSpec.from_dict(payload["spec"], source=str(path))
    resolve_arch(spec.arch)
    model = spec.build_model()
    load_state(model, payload["state_dict"], source=str(path))
    return model.to(device).eval(), spec


def load_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, source: str,
               strict: bool = True) -> list[str]:
    """Load weights with a readable message for shape mismatches; returns skipped keys when not strict."""
    own = model.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if mismatched and strict:
        raise AgecliError(f"{source} does not fit this model ({len(mismatched)} tensors differ in shape), e.g.\n  "
                          + "\n  ".join(mismatched[:5]) + "\nCheck --arch, --encoding and --gender.")
    keep = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    result = model.load_state_dict(keep, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        missing, unexpected = result.missing_keys[:5], [k for k in state_dict if k not in own][:5]
        raise AgecliError(f"{source} does not match this model: missing {missing}, unexpected {unexpected}.")
    return [k for k in state_dict if k not in keep]


def sniff(path: Path) -> str:
    """Guess a model file's kind from its first bytes: torch, or a phrase saying what it is instead."""
    if path.is_dir():
        return "a folder"
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not head:
        return "an empty file"
    if zipfile.is_zipfile(path):
        return "a TorchScript model" if _is_torchscript(path) else "torch"
    if head[:2] == b"\x80\x02":
        return "torch"
    if head[:4] == b"PK\x03\x04":  # a zip without its directory at the end: a save or copy cut short
        return "a truncated or damaged zip archive (a PyTorch save cut short?)"
    if head[:1] == b"\x08" and b"onnx" in open(path, "rb").read(4096).lower() or path.suffix.lower() == ".onnx":
        return "an ONNX model"
    if head.strip()[:1] in (b"{", b"["):
        return "a JSON/text file"
    return "an unknown binary file" if b"\x00" in head else "a text file"


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds its code; a torch.save archive holds only data."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in name or name.endswith("/constants.pkl") for name in names)


def _describe_payload(payload: Any) -> str:
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return f"a plain state dict with {len(payload)} tensors"
    if isinstance(payload, dict):
        return f"a dict with keys {sorted(map(str, payload))[:6]}"
    return f"a {type(payload).__name__}"
