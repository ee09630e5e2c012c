"""Any ONNX age model as a teacher, fed and read as its `OnnxSpec` says.

    OnnxTeacher("model.onnx", OnnxSpec.parse("input_size=64,mean=122.8/117/104.3,output=probs"))

The spec comes from `--teacher-spec key=value,...`, from a JSON sidecar next to the model
(`model.json` or `model.onnx.json`, see `sidecar_spec`), or both (the flag's keys win).
Scores over K ages (`output=probs|logits`, ages from `ages=` or `age_offset`/`age_step`) are
spread onto ages 0..100; a single regressed age (`output=age`) becomes a Gaussian.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agecli.errors import AgecliError
from agecli.modeling.distributions import age_to_distribution, ages_to_support
from agecli.rundir import fingerprint_file
from agecli.stages.export import onnx_session
from agecli.stages.teachers.base import Teacher, TeacherOutput


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
        """From `key=value,key=value` (lists with '/': mean=122.8/117/104.3) or a dict, over `base`."""
        spec = base or cls()
        if text is None:
            return spec
        items = dict(text) if isinstance(text, dict) else _split_items(text)
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
        """The age each of the model's K scores stands for."""
        if self.ages is not None:
            if len(self.ages) != k:
                raise AgecliError(f"the teacher spec lists {len(self.ages)} ages but the model outputs {k} values.")
            return list(self.ages)
        return [self.age_offset + i * self.age_step for i in range(k)]

    def normalisation(self) -> tuple[list[float], list[float]]:
        """(mean, std) in fractions of 1, for RGB input (the `Teacher` base class flips BGR)."""
        if self.std is not None:
            mean, std = [m / 255 for m in self.mean], [s / 255 for s in self.std]
        else:
            mean, std = [m / 255 for m in self.mean], [1 / (255 * self.scale)] * 3
        if self.channels == "BGR":  # the spec gives them in the model's own channel order
            mean, std = mean[::-1], std[::-1]
        return mean, std

    def alignment_dict(self) -> dict[str, Any] | None:
        """The crop the model expects, as an alignment dict (`agecli.data.geometry`); None if unknown."""
        if self.alignment == "dlib_chip":
            return {"method": "dlib_chip", "padding": self.margin}
        if self.alignment not in (None, "none"):
            return {"method": "similarity", "template": self.alignment, "margin": self.margin}
        return None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _split_items(text: str) -> dict[str, str]:
    items = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise AgecliError(f"--teacher-spec item {part!r} is not key=value; e.g. "
                              "input_size=64,mean=122.8/117/104.3,scale=0.0039,output=probs")
        key, value = part.split("=", 1)
        items[key.strip().replace("-", "_")] = value.strip()
    return items


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


def sidecar_files(path: Path) -> list[Path]:
    """Where an ONNX model's spec may be written beside it: `model.json`, `model.onnx.json`."""
    return [path.with_suffix(".json"), path.with_name(path.name + ".json")]


def sidecar_spec(path: Path) -> dict[str, Any] | None:
    """The spec written as JSON next to an ONNX model (`model.json` or `model.onnx.json`), if any."""
    for candidate in sidecar_files(path):
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
        self.path = Path(path)
        if not self.path.exists():
            raise AgecliError(f"ONNX teacher {self.path} does not exist.")
        self.spec = spec
        mean, std = spec.normalisation()
        super().__init__(name or self.path.name, spec.input_size, spec.alignment_dict(), mean, std,
                         bgr=spec.channels == "BGR")
        self._file_fp = fingerprint_file(self.path)
        # idle onnxruntime workers spin by default and starve torch's threads (the student
        # trains, and is timed, in the same process)
        self.session = onnx_session(self.path, device=device, data=self._model_bytes(), spinning=False)
        self.input_name = self._pick_input().name
        out = self._pick_output()
        self.output_name = out.name
        self.age_support = None  # output=age: one value per face, no scores to map
        if spec.output != "age":
            values = spec.age_values(list(out.shape)[-1])
            self.age_values = torch.tensor(values, dtype=torch.float32)
            self.age_support = ages_to_support(values)

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

    def _pick_input(self):
        """The image input: the one named by the spec, else the only one; its shape checked."""
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
        return inp

    def _pick_output(self):
        """The answer: the output named by the spec, else the first; its shape fits `spec.output`."""
        spec, where = self.spec, self.path
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
        elif len(oshape) != 2 or not isinstance(last, int) or last < 2:
            raise AgecliError(f"{where} output {out.name!r} has shape {oshape}; output={spec.output} needs "
                              "N x K scores over K ages. Use output=age for a regressed age.")
        return out

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
