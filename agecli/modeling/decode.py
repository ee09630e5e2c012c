"""What an age model's outputs say about a face: its age in years and P(female).

`AgeModel` (agecli.modeling.backbones) returns {"age": the encoding's head outputs,
"features": pooled features, "gender": two logits (male, female) when it has a gender
head}. Evaluation, export and prediction all read them through `decode`.
"""

from __future__ import annotations

import torch

from agecli.modeling.encodings import Encoding


def female_probability(outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """P(female) per face from the gender head (label 1 = female); None without a gender head."""
    if "gender" not in outputs:
        return None
    return torch.softmax(outputs["gender"].float(), dim=1)[:, 1]


def decode(outputs: dict[str, torch.Tensor], encoding: Encoding) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(age in years, float (B,); P(female), (B,) or None) from a model's outputs."""
    return encoding.predict(outputs["age"]).float(), female_probability(outputs)
