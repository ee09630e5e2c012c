"""An exponential moving average of a model's weights (Polyak averaging; timm's ModelEmaV2).

    average = WeightAverage(model, decay=0.998)
    average.update()                       # after every optimiser step
    with average.applied():                # the averaged weights in the model, then its own back
        validate(model, ...)

The average follows the weights over the last ~1 / (1 - decay) steps, which smooths the
step-to-step noise of the late, low learning-rate part of training. Early on the decay is
lowered to (1 + n) / (10 + n) after n updates, so the average does not start out dominated
by the initial weights. Floating-point parameters and buffers are averaged (BatchNorm's
statistics too; fit recalibrates them on the averaged weights anyway), integer buffers
(BatchNorm's step count) are copied. Its state goes into last.pt, so a resumed run
continues the same average.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"the average's decay must lie in (0, 1), got {decay}")
        self.model, self.decay, self.updates = model, float(decay), 0
        self.shadow = {name: value.detach().clone() for name, value in model.state_dict().items()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, value in self.model.state_dict().items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadow.mul_(decay).add_(value.detach().to(shadow.dtype), alpha=1 - decay)
            else:
                shadow.copy_(value)

    @contextlib.contextmanager
    def applied(self) -> Iterator[torch.nn.Module]:
        """The model holding the averaged weights inside the block, its own weights after it."""
        own = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
        self.model.load_state_dict(self.shadow)
        try:
            yield self.model
        finally:
            self.model.load_state_dict(own)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
