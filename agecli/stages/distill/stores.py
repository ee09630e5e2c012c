"""Reading a labelled and an unlabelled face store as one (distill's `--unlabelled`).

    ConcatStore.of(labelled, unlabelled)  -> a FaceStore look-alike over both, labels of the second hidden
    store_key(store)                      -> content identity of a store or a concatenation
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from agecli.errors import AgecliError
from agecli.store import LABEL_COLUMNS, FaceStore, unlabel


class _ConcatImages:
    """Rows of several memory-mapped face arrays, addressed as one."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        scalar = rows.ndim == 0
        rows = np.atleast_1d(rows)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for k, part in enumerate(self.parts):
            mask = which == k
            if mask.any():
                out[mask] = part[rows[mask] - self.offsets[k]]
        return out[0] if scalar else out


@dataclass
class ConcatStore:
    """A labelled store followed by an unlabelled one (its labels hidden), read as one FaceStore.

    Rows 0..n_labelled-1 are the labelled store's (splits kept); the unlabelled store's rows
    follow, all in the train split with unknown ages (the teacher labels them)."""

    root: Path
    images: Any
    records: pd.DataFrame
    manifest: dict[str, Any]
    parts: list[tuple[str, int, int]] = field(default_factory=list)  # (run, start, stop)

    @classmethod
    def of(cls, labelled: FaceStore | None, unlabelled: FaceStore) -> "ConcatStore":
        hidden = unlabel(unlabelled.records)
        if labelled is None:
            # the unlabelled run alone: train on its train split, label-free; its val/test keep their
            # labels so the student can still be scored (they are never trained on)
            keep = unlabelled.records["split"] != "train"
            for col in LABEL_COLUMNS:
                hidden.loc[keep, col] = unlabelled.records.loc[keep, col]
            return cls(unlabelled.root, unlabelled.images, hidden.reset_index(drop=True), unlabelled.manifest,
                       [(str(unlabelled.root.parent), 0, len(hidden))])
        if labelled.size != unlabelled.size:
            raise AgecliError(f"the labelled run holds {labelled.size} px faces and the unlabelled run {unlabelled.size} "
                              "px faces; prepare both with the same --size.")
        if labelled.alignment.to_dict() != unlabelled.alignment.to_dict():
            warnings.warn(f"the labelled and unlabelled runs are aligned differently ({labelled.alignment} vs "
                          f"{unlabelled.alignment}); the student will see both framings.", stacklevel=2)
        hidden["split"] = "train"
        records = pd.concat([labelled.records, hidden], ignore_index=True)
        n = len(labelled.records)
        return cls(labelled.root, _ConcatImages([labelled.images, unlabelled.images]), records, labelled.manifest,
                   [(str(labelled.root.parent), 0, n), (str(unlabelled.root.parent), n, len(records))])

    alignment = FaceStore.alignment
    size = FaceStore.size
    dataset = FaceStore.dataset
    has_ages = FaceStore.has_ages
    indices = FaceStore.indices
    folds = FaceStore.folds


def store_key(store: FaceStore | ConcatStore) -> str:
    """Content identity of a store (or a concatenation): its prepare manifests' file hashes."""
    if isinstance(store, ConcatStore):
        keys = [FaceStore.open(run).fingerprint() + f"[{a}:{b}]" for run, a, b in store.parts]
        return "+".join(keys)
    return store.fingerprint()
