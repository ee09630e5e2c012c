"""How a model wants faces cut out of photos, shared by predict, the Python API and export.

    crop_alignment(spec)          -> (Alignment, notes): the crop predict makes for this model
    crop_recipe(spec)             -> the same crop as plain numbers (export writes it into ONNX metadata)
    photo_faces(spec, photos)     -> aligned uint8 crops of every face found in some photos
    SAMPLE_PHOTOS                 -> the photos bundled with agecli (agecli/sample/photos)

A model trained on crops that came already aligned (alignment method "resize", e.g.
UTKFace chips) is fed crops warped onto that dataset's landmark template (`utkface_chip`),
so a detected face is framed like the training crops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from agecli.store import Alignment

SAMPLE_PHOTOS = Path(__file__).resolve().parents[1] / "sample" / "photos"
LANDMARK_ORDER = ["eye on the image's left", "eye on the image's right", "nose tip", "mouth, image's left",
                  "mouth, image's right"]


def crop_alignment(spec) -> tuple[Alignment, list[str]]:
    """How to cut faces out of photos for this model (see the module docstring)."""
    from agecli.data.faces import TEMPLATES

    data = dict(spec.alignment or {})
    notes: list[str] = []
    alignment = Alignment.from_dict(data)
    if "size" not in data:
        alignment.size = int(spec.input_size)
    if not data:
        notes.append("the checkpoint records no face alignment; using the utkface_chip template (margin 0).")
        return Alignment("similarity", alignment.size, 0.0, "utkface_chip"), notes
    if alignment.method == "resize":
        template = alignment.template if alignment.template in TEMPLATES else "utkface_chip"
        if template != alignment.template:
            notes.append(f"the model was trained on ready-made crops (template {alignment.template!r}); detected "
                         "faces are aligned to the utkface_chip template, which frames faces like UTKFace chips.")
        margin = alignment.margin if alignment.template in TEMPLATES else 0.0
        return Alignment("similarity", alignment.size, margin, template), notes
    return alignment, notes


def crop_recipe(spec) -> dict[str, Any]:
    """The crop of `crop_alignment` as numbers: where the five landmarks go, in crop pixels."""
    from agecli.data.faces import template_pixels

    alignment, _ = crop_alignment(spec)
    return {
        "landmarks": "5 points (x, y) in source pixels, in this order: " + "; ".join(LANDMARK_ORDER)
                     + " (MTCNN's order)",
        "crop_size": int(alignment.size),
        "template_px": [[round(float(v), 4) for v in point] for point in template_pixels(alignment)],
        "template": alignment.template,
        "margin": float(alignment.margin),
        "matrix": "the least-squares similarity (rotation, uniform scale, shift; Umeyama) that maps the 5 "
                  "landmarks onto template_px; warp with it to crop_size x crop_size, bilinear, black border "
                  "(when the similarity shrinks by more than 2x, area-resize the source region first)",
        "resize": f"crop_size -> input_size ({int(spec.input_size)}): bilinear with antialiasing "
                  "(a triangle filter as wide as the scale; PIL's and torch's antialiased bilinear)",
    }


def photo_faces(spec, photos: Sequence[Path], *, limit: int = 64, device: str = "cpu") -> np.ndarray:
    """Aligned uint8 crops (N, S, S, 3) of the faces MTCNN finds in `photos`, cut as predict cuts them."""
    from agecli.data.faces import Detector, align, read_image

    alignment, _ = crop_alignment(spec)
    detector = Detector(device=device, max_side=960, min_face_fraction=0.03, min_score=0.9)
    crops = []
    for path in photos:
        image = read_image(path)
        crops += [align(image, d.landmarks, alignment) for d in detector.detect([image])[0]]
        if len(crops) >= limit:
            break
    return np.stack(crops[:limit]) if crops else np.zeros((0, alignment.size, alignment.size, 3), np.uint8)
