"""The teacher interface: a face crop in, an age, a distribution over ages and features out.

Every teacher receives the store's crop (augmented or not) as an un-normalised RGB image in
[0, 1] and does its own preprocessing: re-crop (when its training alignment differs from the
store's and both are known, see `agecli.data.geometry`), resize to its input size, its own
mean/std and channel order. Regions outside the stored crop repeat the border. When the
store's alignment is unknown the crop is only resized, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from agecli.data.batches import normalise, resize
from agecli.data.geometry import Geometry, alignment_geometry, crop_transform, grid_theta


@dataclass
class TeacherOutput:
    age: torch.Tensor                    # (B,) expected age in years
    probs: torch.Tensor                  # (B, 101) distribution over ages 0..100
    features: torch.Tensor | None = None  # (B, D) pooled features (for hint distillation)

    def to(self, device: str | torch.device) -> "TeacherOutput":
        return TeacherOutput(self.age.to(device), self.probs.to(device),
                             None if self.features is None else self.features.to(device))


class Teacher:
    """Base class: subclasses set `input_size`, `alignment`, `mean`, `std` (fractions of 1),
    and implement `_forward(x_normalised) -> TeacherOutput` and `fingerprint()`."""

    kind = "teacher"
    support = "ages"

    def __init__(self, name: str, input_size: int, alignment: dict[str, Any] | None,
                 mean: Sequence[float], std: Sequence[float], bgr: bool = False):
        self.name = name
        self.input_size = int(input_size)
        self.alignment = alignment
        self.mean, self.std, self.bgr = tuple(mean), tuple(std), bgr
        self._theta: torch.Tensor | None = None
        self.binding: dict[str, Any] = {"recrop": None}
        self.mirror = False  # answers averaged with those on the mirror image (`set_mirror`)

    # ---- what makes outputs reproducible (cache keys, provenance)
    def fingerprint(self) -> str:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        mirror = {"mirror": True} if self.mirror else {}
        return {"name": self.name, "kind": self.kind, "input_size": self.input_size,
                "alignment": self.alignment, "fingerprint": self.fingerprint(), **mirror, **self.binding}

    def cache_key(self) -> str:
        theta = None if self._theta is None else [round(v, 6) for v in self._theta.flatten().tolist()]
        parts = [self.fingerprint(), theta] + (["mirror"] if self.mirror else [])  # older banks keep their keys
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def set_mirror(self, on: bool = True) -> "Teacher":
        """Answer every crop as the mean of the answers on it and on its mirror image: a steadier
        teacher at twice the cost (the face-recognition pair: UTKFace test MAE 4.45 against 4.50)."""
        self.mirror = bool(on)
        return self

    # ---- adapting to a store
    def bind(self, store_alignment: dict[str, Any] | None, store_size: int, *,
             dataset: str | None = None, recrop: bool = True) -> list[str]:
        """Prepare to read crops aligned as `store_alignment`; returns warnings (also issued)."""
        notes: list[str] = []
        self._theta = None
        self.binding = {"recrop": None, "store_alignment": store_alignment}
        same = (self.alignment is not None and store_alignment is not None
                and _alignment_key(self.alignment) == _alignment_key(store_alignment))
        if recrop and not same and self.alignment is not None:
            mine = alignment_geometry(self.alignment)
            theirs = alignment_geometry(store_alignment, dataset)
            if mine is not None and theirs is not None:
                self._set_recrop(mine, theirs)
            else:
                unknown = "the store's" if theirs is None else "the teacher's"
                notes.append(f"teacher {self.name}: {unknown} face alignment is unknown "
                             f"(teacher {self.alignment}, store {store_alignment}); crops are only resized, "
                             "which can cost the teacher accuracy.")
        if self.input_size > store_size:
            notes.append(f"teacher {self.name} takes {self.input_size} px but the store holds {store_size} px "
                         "crops; they are upsampled (prepare with a larger --size to avoid this).")
        for note in notes:
            warnings.warn(note, stacklevel=2)
        self.binding["warnings"] = notes
        return notes

    def _set_recrop(self, mine: Geometry, theirs: Geometry) -> None:
        """Re-crop the store's faces into this teacher's framing, unless the two nearly agree."""
        m = crop_transform(mine, theirs)
        scale = math.hypot(m[0, 0], m[1, 0])
        # eyes-only maps (agecli template <-> dlib chip) compare eye centres with the mean
        # of eye corners; they are trusted only beyond that uncertainty. Measured on 2000
        # UTKFace chips (utkface_chip, margin 0): the map is scale 1.048, shift (-0.018,
        # -0.023), and dlib-age's MAE is 6.06 resized vs 6.24 re-cropped at 64 px.
        tolerance = 1e-3 if (mine.points5 and theirs.points5) else 0.06
        if abs(scale - 1) > tolerance or np.abs(m[:, 2]).max() > tolerance / 2 or abs(m[1, 0]) > tolerance:
            self._theta = grid_theta(m)
            self.binding["recrop"] = {"from": theirs.name, "to": mine.name, "scale": round(float(scale), 4),
                                      "shift": [round(float(m[0, 2]), 4), round(float(m[1, 2]), 4)]}

    # ---- running
    def preprocess(self, x01: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB crops of the store -> this teacher's input (re-cropped, resized, normalised)."""
        x = x01.float()
        size = self.input_size
        if self._theta is not None:
            if x.shape[-1] > 2 * size:  # shrink first so grid_sample does not alias badly
                x = resize(x, 2 * size)
            theta = self._theta.to(x.device).expand(x.shape[0], 2, 3)
            grid = F.affine_grid(theta, [x.shape[0], 3, size, size], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        else:
            x = resize(x, size)
        mean, std = self.mean, self.std
        if self.bgr:  # mean and std are given for RGB
            x, mean, std = x.flip(1), mean[::-1], std[::-1]
        return normalise(x, mean, std)

    @torch.no_grad()  # not inference_mode: its tensors could not enter the student's loss graph
    def __call__(self, x01: torch.Tensor) -> TeacherOutput:
        x = self.preprocess(x01)
        out = self._forward(x)
        if self.mirror:
            out = mean_output([out, self._forward(x.flip(-1))], [0.5, 0.5])
        return out.to(x01.device)

    def _forward(self, x: torch.Tensor) -> TeacherOutput:
        raise NotImplementedError


def mean_output(outputs: Sequence[TeacherOutput], weights: Sequence[float]) -> TeacherOutput:
    """The weighted mean of answers: ages, distributions and, where all have them, features."""
    age = sum(w * o.age for w, o in zip(weights, outputs))
    probs = sum(w * o.probs for w, o in zip(weights, outputs))
    with_features = all(o.features is not None for o in outputs)
    features = sum(w * o.features for w, o in zip(weights, outputs)) if with_features else None
    return TeacherOutput(age, probs, features)


def _alignment_key(alignment: dict[str, Any]) -> tuple:
    """An alignment without its pixel size: crops differing only in size need no re-crop."""
    return tuple(sorted((k, v) for k, v in alignment.items() if k != "size"))
