"""Label spaces shared by every stage: ages, Adience's 8 groups, gender codes."""

from __future__ import annotations

import math

MAX_AGE = 100  # classification heads cover ages 0..MAX_AGE; older labels are clipped to it

# The 8 official Adience groups (Eidinger et al. 2014), as (low, high) in years.
ADIENCE_GROUPS: tuple[tuple[int, int], ...] = (
    (0, 2), (4, 6), (8, 12), (15, 20), (25, 32), (38, 43), (48, 53), (60, 100),
)
GROUP_NAMES = tuple(f"({lo}, {hi})" for lo, hi in ADIENCE_GROUPS)

GENDER_CODES = {"m": 0, "male": 0, "f": 1, "female": 1}  # UTKFace's 0 = male, 1 = female
GENDER_NAMES = {0: "male", 1: "female"}
UNKNOWN = -1


def group_of_age(age: float) -> int:
    """Adience group for an exact age: the group containing it, else the nearest group.

    The official groups leave gaps (3, 7, 13-14, 21-24, 33-37, 44-47, 54-59); an age in a
    gap goes to the group whose nearest edge is closer (ties go to the older group), which
    is how predictions of an age model are scored on Adience.
    """
    if math.isnan(age):
        return UNKNOWN
    best, best_dist = 0, math.inf
    for index, (lo, hi) in enumerate(ADIENCE_GROUPS):
        dist = 0.0 if lo <= age <= hi else min(abs(age - lo), abs(age - hi))
        if dist <= best_dist:
            best, best_dist = index, dist
        if dist == 0.0:
            return index
    return best


def group_midpoint(group: int) -> float:
    lo, hi = ADIENCE_GROUPS[group]
    return (lo + hi) / 2 if hi < 100 else 65.0
