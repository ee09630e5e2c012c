"""Teachers from what the user typed: a built-in name, a checkpoint, an ONNX file, or several."""

from __future__ import annotations

from typing import Sequence

from agecli.errors import AgecliError
from agecli.modeling.checkpoint import sniff
from agecli.modeling.zoo import DEFAULT_MODEL, resolve_model_ref
from agecli.stages.teachers.base import Teacher
from agecli.stages.teachers.builtin import BUILTIN_TEACHERS
from agecli.stages.teachers.checkpoint import CheckpointTeacher
from agecli.stages.teachers.ensemble import Ensemble
from agecli.stages.teachers.onnx import OnnxSpec, OnnxTeacher, sidecar_spec


def load_teacher(ref: str, *, spec: str | None = None, device: str = "cpu", half: bool = False,
                 hint_layer: str | None = None) -> Teacher:
    """A teacher from a built-in name, an agecli checkpoint (.pt) or an ONNX file (+ spec or sidecar JSON)."""
    if ref in BUILTIN_TEACHERS:
        return BUILTIN_TEACHERS[ref](device=device, spec=spec)
    path = resolve_model_ref(ref)  # a path, or `default`: the student shipped with agecli
    if not path.exists():
        raise AgecliError(f"teacher {ref!r} is neither a file nor a built-in teacher "
                          f"({', '.join([DEFAULT_MODEL, *BUILTIN_TEACHERS])}).")
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
        describes_itself = ref.endswith(".pt") or ref in BUILTIN_TEACHERS or ref == DEFAULT_MODEL
        if spec and describes_itself and len(specs) == 1 and len(refs) > 1:
            spec = None
        teachers.append(load_teacher(ref, spec=spec, device=device, half=half, hint_layer=hint_layer))
    return teachers[0] if len(teachers) == 1 and not weights else Ensemble(teachers, weights)
