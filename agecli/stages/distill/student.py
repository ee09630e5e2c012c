"""The student as `fit` trains it: the model, the loss's learned parts, and an optional
feature tap on one of its layers (for hint and ordinal)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from agecli.data.batches import to_input, to_nchw_unit
from agecli.errors import AgecliError
from agecli.stages.distill.losses import DistillLoss
from agecli.stages.teachers import Teacher


class Student(nn.Module):
    """What `fit` trains: the student plus the loss's learned parts (hint adapters), so that one
    optimiser (and DDP) covers both.

    `state_dict`/`load_state_dict` speak for the student alone, so best.pt and last.pt hold only
    the student and load with `load_checkpoint`; the loss's adapters travel in last.pt's
    training state instead (fit's `extra_state`)."""

    def __init__(self, student: nn.Module, loss: DistillLoss, layer: str | None = None):
        super().__init__()
        self.student = student
        self.loss = loss
        self._hooked: list[torch.Tensor] = []
        self.layer = layer
        if layer:
            modules = dict(student.named_modules())
            if layer not in modules:
                raise AgecliError(f"the student has no layer {layer!r}; layers include: "
                                  f"{', '.join(n for n in list(modules)[1:40])} ...")
            self._handle = modules[layer].register_forward_hook(lambda _m, _i, out: self._hooked.append(out))

    def close(self) -> None:
        """Remove the layer hook (a probe wrapper must not leave it on the student)."""
        if self.layer:
            self._handle.remove()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._hooked.clear()
        out = dict(self.student(x))
        if self._hooked:
            h = self._hooked[-1]
            out["hint_source"] = h.mean(dim=(2, 3)) if h.ndim == 4 else h.flatten(1)
        return out

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return self.student.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        return self.student.load_state_dict(state_dict, strict=strict, assign=assign)


@torch.inference_mode()
def feature_widths(model: nn.Module, teacher: Teacher | None, store, rows, size: int,
                   student_layer: str | None, norm) -> dict[str, Any]:
    """Feature widths of student (pooled or a named layer) and teacher, from two faces: the
    shape of the hint adapter."""
    images = torch.from_numpy(np.ascontiguousarray(store.images[np.sort(rows[:2])]))
    x = to_input(images, size, *norm)
    was = model.training
    model.eval()
    wrapped = Student(model, DistillLoss([]), layer=student_layer)
    out = wrapped(x)
    wrapped.close()
    model.train(was)
    f_s = out.get("hint_source", out["features"])
    t_dim = None
    if teacher is not None:
        t = teacher(to_nchw_unit(images))
        t_dim = None if t.features is None else int(t.features.shape[1])
    return {"student_dim": int(f_s.shape[1]), "teacher_dim": t_dim}
