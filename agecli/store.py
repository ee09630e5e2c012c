"""The face store written by `prepare` and read by every later stage.

Layout of RUN/prepare/ (all written atomically; see agecli.rundir):

    faces.npy      uint8 array (N, S, S, 3), RGB, aligned crops; opened memory-mapped
    records.csv    one row per stored face, row i <-> faces[i] (columns: RECORD_COLUMNS)
    rejects.csv    path, reason    (images seen but not stored)
    manifest.json  stage manifest, plus "alignment", "dataset", "protocol", "label_space"

Splits are columns, not lists of indices: `split` is the run's default hold-out split
(train/val/test; val is seeded), `fold` the dataset's cross-validation fold (Adience 0-4,
FG-NET subject number; -1 where none). Content-identical images share `content` and always
share a split.

`labelled_fraction` (train, distill) keeps the labels of a fixed share of the training faces:
`keeps_label` is the one rule, `labelled_subset` and `hide_labels` apply it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agecli.errors import AgecliError
from agecli.rundir import data_fingerprint, require_stage

RECORD_COLUMNS = [
    "path",       # source image, relative to the dataset root
    "age",        # float years (NaN when unknown); Adience: the group's midpoint
    "age_std",    # apparent-age standard deviation (LAP 2016), else NaN
    "gender",     # 0 male, 1 female, -1 unknown
    "race",       # UTKFace code 0-4, -1 unknown
    "group",      # Adience group 0-7, -1 when not applicable
    "fold",       # cross-validation fold or subject, -1 when none
    "subject",    # person / album id where the dataset has one, else ""
    "split",      # train | val | test  (default hold-out protocol)
    "content",    # sha1 of the image bytes (duplicates share it)
    "detector",   # mtcnn | none
    "score",      # detection probability (NaN with --detector none)
    "box",        # "x1 y1 x2 y2" in source pixels ("" with --detector none)
    "landmarks",  # 10 numbers "x y ..." for eyes, nose, mouth corners ("" when none)
    "chosen_by",  # how the face was picked: only | metadata_box | largest_central | all
]

SPLITS = ("train", "val", "test")
LABEL_COLUMNS = ("age", "age_std", "gender")   # what an unlabelled face does not know (gender: -1)


@dataclass
class Alignment:
    """How faces were cut out; recorded in the prepare manifest and in every checkpoint so
    that training, evaluation and prediction crop faces identically."""

    method: str = "similarity"        # similarity (5-point template) | resize (crops as given)
    size: int = 128                   # output side in pixels
    margin: float = 0.4               # extra context around the template, fraction of the face box
    template: str = "arcface5"        # name of the 5-point template (agecli.faces.TEMPLATES)

    def to_dict(self) -> dict[str, Any]:
        return dict(method=self.method, size=self.size, margin=self.margin, template=self.template)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Alignment":
        return cls(**{k: data[k] for k in ("method", "size", "margin", "template") if k in data})


@dataclass
class FaceStore:
    """Read side of a prepared run: memory-mapped faces plus their records."""

    root: Path
    images: np.ndarray
    records: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, run: str | os.PathLike) -> "FaceStore":
        run = Path(run)
        manifest = require_stage(run, "prepare")
        root = run / "prepare"
        try:
            images = np.load(root / "faces.npy", mmap_mode="r")
        except (FileNotFoundError, ValueError) as exc:
            raise AgecliError(f"{root / 'faces.npy'} is missing or damaged ({exc}); re-run prepare.") from None
        records = read_records(root / "records.csv")
        if len(records) != len(images):
            raise AgecliError(
                f"{root}: records.csv has {len(records)} rows but faces.npy holds {len(images)} faces; "
                "re-run prepare.")
        return cls(root=root, images=images, records=records, manifest=manifest)

    @property
    def alignment(self) -> Alignment:
        return Alignment.from_dict(self.manifest.get("alignment", {}))

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    @property
    def dataset(self) -> str:
        return self.manifest.get("dataset", "unknown")

    @property
    def has_ages(self) -> bool:
        return bool(self.records["age"].notna().any())

    def indices(self, split: str, fold: int | None = None) -> np.ndarray:
        """Row indices of a split.

        split: train | val | test | all | labelled. With `fold` (cross-validation), test is
        that fold, val stays the seeded val rows outside it, and train is everything else.
        """
        rec = self.records
        if split == "all":
            mask = np.ones(len(rec), dtype=bool)
        elif split == "labelled":
            mask = rec["age"].notna().to_numpy()
        elif split not in SPLITS:
            raise AgecliError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}, all, labelled.")
        elif fold is None:
            mask = (rec["split"] == split).to_numpy()
        else:
            folds = rec["fold"].to_numpy()
            if fold not in set(folds.tolist()):
                raise AgecliError(f"fold {fold} does not exist in this run (folds: {sorted(set(folds.tolist()) - {-1})}).")
            in_fold = folds == fold
            is_val = (rec["split"] == "val").to_numpy() & ~in_fold
            mask = {"test": in_fold, "val": is_val, "train": ~in_fold & ~is_val}[split]
        return np.flatnonzero(mask)

    def fingerprint(self) -> str:
        """Identity of the data (`agecli.rundir.data_fingerprint`). A model's checkpoint keeps
        it, so evaluating on other data is noticed."""
        return data_fingerprint(self.manifest, self.root)

    def folds(self) -> list[int]:
        return sorted(int(f) for f in set(self.records["fold"].tolist()) if f != -1)


def face_keys(records: pd.DataFrame, rows) -> np.ndarray:
    """One int64 key per row of `rows`: 60 bits of a hash of its `content` (the sha1 of its image
    file), so identical images share it whatever their path, run or split. A model records the
    keys of the faces it learned from (`agecli.modeling.checkpoint.Seen`); scoring it on any of
    them later is then noticed."""
    rows = np.asarray(rows, dtype=np.int64)
    contents, paths = records["content"].to_numpy()[rows], records["path"].to_numpy()[rows]
    names = [c if isinstance(c, str) and c else f"path:{p}" for c, p in zip(contents, paths)]   # no hash: its path
    return np.array([int(hashlib.sha1(n.encode()).hexdigest()[:15], 16) for n in names], dtype=np.int64)


def read_records(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"path": str, "subject": str, "split": str, "content": str,
                                         "box": str, "landmarks": str, "chosen_by": str, "detector": str},
                            keep_default_na=False, na_values={"age": [""], "age_std": [""], "score": [""]})
    except FileNotFoundError:
        raise AgecliError(f"{path} is missing; re-run prepare.") from None
    missing = [c for c in RECORD_COLUMNS if c not in frame.columns]
    if missing:
        raise AgecliError(f"{path} lacks columns {missing}; it was not written by this agecli. Re-run prepare.")
    for column in ("gender", "race", "group", "fold"):
        frame[column] = frame[column].astype(int)
    for column in ("age", "age_std", "score"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame


# --------------------------------------------------------------------------- labelled_fraction
def label_draws(paths) -> np.ndarray:
    """Each face's fixed number in [0, 1) for `labelled_fraction`: the top 53 bits of the sha256
    of its record's `path` (the source image, relative to the dataset root).

    A hash of the record, not a seeded draw, so the choice is the same in every stage, seed
    and process, and after re-preparing at another size or alignment; faces of one image
    share it, as they share its labels."""
    return np.array([(int.from_bytes(hashlib.sha256(str(p).encode()).digest()[:8], "big") >> 11) / 2.0 ** 53
                     for p in paths], dtype=np.float64).reshape(-1)


def keeps_label(records: pd.DataFrame, fraction: float) -> np.ndarray:
    """Per record: whether a run with `labelled_fraction` = fraction keeps its labels (its draw
    is below the fraction). Nested: the faces kept at 0.1 are kept at 0.2 too; 1 keeps all."""
    if fraction >= 1:
        return np.ones(len(records), dtype=bool)
    return label_draws(records["path"].tolist()) < fraction


def labelled_subset(store, rows, fraction: float) -> np.ndarray:
    """The rows of `rows` (training rows) whose labels `fraction` keeps, in their order."""
    rows = np.asarray(rows, dtype=np.int64)
    if fraction >= 1:
        return rows
    return rows[keeps_label(store.records.iloc[rows], fraction)]


def hide_labels(store, rows, fraction: float):
    """`store` (a FaceStore or a look-alike dataclass) with the labels of the `rows` that
    `fraction` does not keep made unknown, as an unlabelled face's are; the store itself when
    every label is kept. Only the records are copied; the faces stay memory-mapped."""
    rows = np.asarray(rows, dtype=np.int64)
    hidden = np.setdiff1d(rows, labelled_subset(store, rows, fraction))
    if not len(hidden):
        return store
    return dataclasses.replace(store, records=unlabel(store.records, hidden))


def unlabel(records: pd.DataFrame, rows=None) -> pd.DataFrame:
    """A copy of `records` whose `rows` (positions; None = all) know no labels, as an unlabelled
    face's: age and age_std NaN, gender -1. The one home of that convention."""
    records = records.copy()
    rows = np.arange(len(records)) if rows is None else np.asarray(rows, dtype=np.int64)
    for column in LABEL_COLUMNS:
        records.iloc[rows, records.columns.get_loc(column)] = -1 if column == "gender" else np.nan
    return records
