"""Age target encodings (Antipov et al. 2017): how a head's outputs relate to an age.

Every encoding builds its own head, its own loss and its own decoding, so the training
loop, distillation and evaluation never branch on the encoding's name:

    regression      1 output, L1 or L2 on a standardised age
    classification  one class per age 0..MAX_AGE, cross-entropy, argmax or expected decoding
    ldae            label distribution age encoding: a Gaussian over ages, KL loss,
                    expected-value decoding (the paper's best)
    ordinal         CORAL: one shared score, MAX_AGE ordered thresholds, rank-consistent
    groups          Adience's 8 groups, cross-entropy, exact and 1-off accuracy

`distribution(outputs, T)` returns a probability distribution over the encoding's support
(ages 0..MAX_AGE, or the 8 groups), which is what distillation compares.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from agecli.errors import AgecliError
from agecli.labels import ADIENCE_GROUPS, MAX_AGE, group_midpoint

AGES = torch.arange(MAX_AGE + 1, dtype=torch.float32)
_AGE_CENTER, _AGE_SCALE = 35.0, 20.0  # regression targets are (age - 35) / 20


def gaussian_targets(ages: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Discretised Gaussian over ages 0..MAX_AGE centred on each age (rows sum to 1)."""
    support = AGES.to(ages.device)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=ages.device).clamp_min(0.5)
    if sigma.ndim == 1:
        sigma = sigma[:, None]
    logits = -0.5 * ((support[None, :] - ages[:, None].float()) / sigma) ** 2
    return torch.softmax(logits, dim=1)


@dataclass
class Encoding:
    name: ClassVar[str] = ""
    support: ClassVar[str] = "ages"  # ages | groups | none

    @property
    def num_outputs(self) -> int:
        raise NotImplementedError

    def make_head(self, in_features: int) -> nn.Module:
        return nn.Linear(in_features, self.num_outputs)

    def loss(self, outputs: torch.Tensor, ages: torch.Tensor, age_std: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """Predicted age in years (float) per row."""
        raise NotImplementedError

    def distribution(self, outputs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor | None:
        """Probabilities over the support, softened by `temperature`; None for regression."""
        return torch.softmax(outputs.float() / temperature, dim=1)

    def log_distribution(self, outputs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor | None:
        return torch.log_softmax(outputs.float() / temperature, dim=1)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


@dataclass
class Regression(Encoding):
    name: ClassVar[str] = "regression"
    support: ClassVar[str] = "none"
    loss_kind: str = "l1"  # l1 | l2

    @property
    def num_outputs(self) -> int:
        return 1

    def loss(self, outputs, ages, age_std=None):
        target = (ages.float() - _AGE_CENTER) / _AGE_SCALE
        pred = outputs.float().squeeze(1)
        return F.l1_loss(pred, target) if self.loss_kind == "l1" else F.mse_loss(pred, target)

    def predict(self, outputs):
        return outputs.float().squeeze(1) * _AGE_SCALE + _AGE_CENTER

    def distribution(self, outputs, temperature=1.0):
        return None

    def log_distribution(self, outputs, temperature=1.0):
        return None


@dataclass
class Classification(Encoding):
    name: ClassVar[str] = "classification"
    decode: str = "expected"  # expected | argmax
    label_smoothing: float = 0.1

    @property
    def num_outputs(self) -> int:
        return MAX_AGE + 1

    def loss(self, outputs, ages, age_std=None):
        target = ages.round().clamp(0, MAX_AGE).long()
        return F.cross_entropy(outputs.float(), target, label_smoothing=self.label_smoothing)

    def predict(self, outputs):
        if self.decode == "argmax":
            return outputs.argmax(dim=1).float()
        return (torch.softmax(outputs.float(), dim=1) * AGES.to(outputs.device)).sum(dim=1)


@dataclass
class LDAE(Encoding):
    name: ClassVar[str] = "ldae"
    sigma: float = 2.0

    @property
    def num_outputs(self) -> int:
        return MAX_AGE + 1

    def loss(self, outputs, ages, age_std=None):
        sigma: torch.Tensor | float = self.sigma
        if age_std is not None:  # apparent-age datasets: at least the annotators' spread
            std = torch.nan_to_num(age_std.float(), nan=0.0)
            sigma = torch.clamp(std, min=self.sigma)
        target = gaussian_targets(ages.clamp(0, MAX_AGE), sigma)
        return F.kl_div(torch.log_softmax(outputs.float(), dim=1), target, reduction="batchmean")

    def predict(self, outputs):
        return (torch.softmax(outputs.float(), dim=1) * AGES.to(outputs.device)).sum(dim=1)


class _CoralHead(nn.Module):
    """One shared score w.x plus MAX_AGE ordered biases (Cao et al. 2020, CORAL)."""

    def __init__(self, in_features: int, num_thresholds: int):
        super().__init__()
        self.score = nn.Linear(in_features, 1, bias=False)
        self.bias = nn.Parameter(torch.linspace(2.0, -2.0, num_thresholds))

    def forward(self, x):
        return self.score(x) + self.bias


@dataclass
class Ordinal(Encoding):
    name: ClassVar[str] = "ordinal"

    @property
    def num_outputs(self) -> int:
        return MAX_AGE  # logit of P(age > k) for k = 0..MAX_AGE-1

    def make_head(self, in_features):
        return _CoralHead(in_features, self.num_outputs)

    def loss(self, outputs, ages, age_std=None):
        thresholds = torch.arange(self.num_outputs, device=outputs.device)
        levels = (ages[:, None].round() > thresholds[None, :]).float()
        return F.binary_cross_entropy_with_logits(outputs.float(), levels, reduction="none").sum(1).mean()

    def predict(self, outputs):
        return torch.sigmoid(outputs.float()).sum(dim=1)

    def distribution(self, outputs, temperature=1.0):
        above = torch.sigmoid(outputs.float() / temperature)  # P(age > k)
        cumulative = torch.cat([torch.ones_like(above[:, :1]), above, torch.zeros_like(above[:, :1])], 1)
        return (cumulative[:, :-1] - cumulative[:, 1:]).clamp_min(1e-8)

    def log_distribution(self, outputs, temperature=1.0):
        probs = self.distribution(outputs, temperature)
        return torch.log(probs / probs.sum(1, keepdim=True))


@dataclass
class Groups(Encoding):
    name: ClassVar[str] = "groups"
    support: ClassVar[str] = "groups"
    label_smoothing: float = 0.0

    @property
    def num_outputs(self) -> int:
        return len(ADIENCE_GROUPS)

    def loss(self, outputs, ages, age_std=None):
        from agecli.labels import group_of_age

        groups = torch.tensor([group_of_age(float(a)) for a in ages.cpu()], device=outputs.device)
        return F.cross_entropy(outputs.float(), groups, label_smoothing=self.label_smoothing)

    def predict(self, outputs):
        mids = torch.tensor([group_midpoint(g) for g in range(len(ADIENCE_GROUPS))], device=outputs.device)
        return mids[outputs.argmax(dim=1)]

    def predict_group(self, outputs):
        return outputs.argmax(dim=1)


ENCODINGS: dict[str, type[Encoding]] = {cls.name: cls for cls in (Regression, Classification, LDAE, Ordinal, Groups)}


def build_encoding(name_or_dict: str | dict[str, Any], **options: Any) -> Encoding:
    """`build_encoding("ldae", sigma=3)` or `build_encoding(checkpoint_spec["encoding"])`."""
    if isinstance(name_or_dict, dict):
        options = {**{k: v for k, v in name_or_dict.items() if k != "name"}, **options}
        name = name_or_dict["name"]
    else:
        name = name_or_dict
    if name not in ENCODINGS:
        raise AgecliError(f"unknown encoding {name!r}; choose one of: {', '.join(ENCODINGS)}.")
    cls = ENCODINGS[name]
    fields = set(cls.__dataclass_fields__)
    unknown = set(options) - fields
    if unknown:
        raise AgecliError(f"encoding {name!r} takes no option(s) {sorted(unknown)}; it accepts {sorted(fields) or 'none'}.")
    return cls(**options)
