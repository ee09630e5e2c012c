"""Where landmarks sit in a face crop, and the map between two crops of the same face.

agecli crops are described by a 5-point template and a margin (`agecli.store.Alignment`);
the dlib models were trained on dlib face chips (5-point shape predictor, padding 0.2).
When both alignments are known, `crop_transform` gives the similarity that maps one crop's
coordinates into the other's: from all 5 points for two agecli templates, from the two eye
centres between an agecli template and a dlib chip (whose points are eye corners and the
nose base). `grid_theta` turns it into `affine_grid`'s coordinates, so a model can sample
its own crop out of a stored one (teachers do, `agecli.stages.teachers`).

    alignment_geometry({"method": "dlib_chip", "padding": 0.2})  -> Geometry
    crop_transform(teacher_geometry, store_geometry)               -> 2x3 map, [0, 1] coords
    grid_theta(m)                                                  -> (2, 3) float32 tensor
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# dlib's 5-point face chip template (dlib/image_transforms/interpolation.h,
# get_face_chip_details) in [0, 1] face coordinates before padding: outer and inner corner of
# the eye on the image's right, outer and inner corner of the eye on the image's left, nose base.
DLIB_CHIP_POINTS = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                             [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                             [0.4901123135679, 0.6277975316475]])


@dataclass(frozen=True)
class Geometry:
    """Where landmarks sit in a square crop, in [0, 1] crop coordinates.

    `points5` are the 5 MTCNN-order points (eyes, nose tip, mouth corners) when known;
    `eyes` the two eye centres (image-left first), always known."""

    name: str
    eyes: tuple[tuple[float, float], tuple[float, float]]
    points5: tuple[tuple[float, float], ...] | None = None


def dlib_chip_geometry(padding: float = 0.2) -> Geometry:
    """A dlib face chip with `padding`: eye centres are the means of the eye corners."""
    pts = (DLIB_CHIP_POINTS + padding) / (1 + 2 * padding)
    left, right = pts[2:4].mean(0), pts[0:2].mean(0)
    return Geometry(f"dlib_chip(padding={padding:g})", (tuple(left), tuple(right)))


def template_geometry(template: str, margin: float) -> Geometry:
    """An agecli crop: the template shrunk by (1 + margin) and centred (as `faces.template_pixels`)."""
    from agecli.data.faces import template_points  # faces imports cv2; geometry alone does not need it

    pts = (np.asarray(template_points(template), dtype=np.float64) + margin / 2) / (1 + margin)
    return Geometry(f"{template}(margin={margin:g})", (tuple(pts[0]), tuple(pts[1])), tuple(map(tuple, pts)))


def alignment_geometry(alignment: dict[str, Any] | None, dataset: str | None = None) -> Geometry | None:
    """Geometry of an alignment dict (agecli Alignment, or {"method": "dlib_chip", "padding": p});
    None when the crop's geometry is unknown (crops used as given, from an unknown source)."""
    if not alignment:
        return None
    method = alignment.get("method", "similarity")
    if method == "dlib_chip":
        return dlib_chip_geometry(float(alignment.get("padding", 0.2)))
    if method == "similarity":
        return template_geometry(alignment.get("template", "arcface5"), float(alignment.get("margin", 0.0)))
    if method == "resize" and (dataset or alignment.get("dataset")) == "utkface":
        # UTKFace's "Aligned & Cropped" chips are framed like the utkface_chip template with no margin
        return template_geometry("utkface_chip", 0.0)
    return None


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift; no reflection) mapping src -> dst, 2x3.

    Solved as a linear system in (a, b, tx, ty); `faces.similarity_transform` fits the same
    model by Umeyama's method for photo alignment. The two agree to rounding, and each keeps
    its own so stored crops and teacher re-crops stay bit-identical to earlier runs."""
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def crop_transform(teacher: Geometry, store: Geometry) -> np.ndarray:
    """2x3 map from the teacher's crop coordinates to the store's ([0, 1] both)."""
    if teacher.points5 is not None and store.points5 is not None:
        return similarity(teacher.points5, store.points5)
    return similarity(teacher.eyes, store.eyes)


def grid_theta(m: np.ndarray) -> torch.Tensor:
    """The same map in `affine_grid`'s [-1, 1] coordinates: n_s = A n_t + (A 1 + 2 b - 1)."""
    a, b = m[:, :2], m[:, 2]
    return torch.tensor(np.concatenate([a, (a.sum(1) + 2 * b - 1)[:, None]], 1), dtype=torch.float32)
