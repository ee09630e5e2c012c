"""Several teachers as one: the weighted average of their answers."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import torch

from agecli.errors import AgecliError
from agecli.stages.teachers.base import Teacher, TeacherOutput, mean_output


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

    def set_mirror(self, on: bool = True) -> "Ensemble":
        for teacher in self.teachers:
            teacher.set_mirror(on)
        self.mirror = bool(on)
        return self

    def bind(self, store_alignment, store_size, *, dataset=None, recrop=True) -> list[str]:
        return [n for t in self.teachers for n in t.bind(store_alignment, store_size, dataset=dataset, recrop=recrop)]

    @torch.no_grad()  # not inference_mode: its tensors could not enter the student's loss graph
    def __call__(self, x01: torch.Tensor) -> TeacherOutput:
        outs = [t(x01) for t in self.teachers]
        mean = mean_output(outs, self.weights)
        # teachers' features may differ in width: the first teacher having them gives them
        features = next((o.features for o in outs if o.features is not None), None)
        return TeacherOutput(mean.age, mean.probs, features)
