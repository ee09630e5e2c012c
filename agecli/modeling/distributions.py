"""Probability distributions over ages 0..MAX_AGE, whatever a model answers with.

    soften(probs, T)              temperature-softened copy of a distribution
    ages_to_support(values)       (K, 101): scores over arbitrary ages -> integer ages
    groups_to_support()           (8, 101): Adience groups -> integer ages
    age_to_distribution(age, s)   one age per row -> discretised Gaussian (label distribution)

Teachers answer in many label spaces (the dlib model's 0.25, 1, ..., 80; Adience groups; a
single regressed age); these maps put every answer on the same support, ages 0..MAX_AGE, so
any teacher can serve any distillation method.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from agecli.labels import ADIENCE_GROUPS, MAX_AGE
from agecli.modeling.encodings import gaussian_targets

NUM_AGES = MAX_AGE + 1


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
    return gaussian_targets(age.float().clamp(0, MAX_AGE), sigma)
