"""labelled_fraction: a fixed share of the training faces keeps its labels (agecli.store.keeps_label).
`agecli train` uses only those; `agecli distill` feeds every training face to the teacher terms and
the labelled ones to the ground-truth term. Validation and test faces are never touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agecli.data.batches import Batches
from agecli.errors import AgecliError
from agecli.options import TrainOptions
from agecli.stages import train as train_stage
from agecli.stages.common import labelled
from agecli.stages.distill import distill
from agecli.stages.distill import losses
from agecli.stages.distill.stage import _open_store, _Rows
from agecli.stages.train import train
from agecli.store import FaceStore, hide_labels, keeps_label, labelled_subset

from conftest import build_store, require_utkface, utkface_faces
from test_distill import brightness_teacher

FAST = dict(batch_size=8, threads=1, workers=0, precise_bn_batches=0)
FRACTIONS = (0.05, 0.1, 0.2, 0.5, 0.9)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """300 real UTKFace faces at 64 px (about 210 training faces) and an instant ONNX teacher."""
    images, records = utkface_faces(300, 64)
    root = tmp_path_factory.mktemp("fraction")
    return build_store(root / "run", images, records), brightness_teacher(root / "teacher.onnx")


def _kept(store: FaceStore, fraction: float) -> np.ndarray:
    """The labelled training rows a run at `fraction` keeps, as the stages must choose them."""
    return labelled_subset(store, labelled(store, store.indices("train")), fraction)


def _spy_batches(monkeypatch) -> list[np.ndarray]:
    """The rows of every training batch (the shuffled ones) that fit draws from the store."""
    seen: list[np.ndarray] = []
    make = Batches._make

    def spy(self, rows):
        if self.shuffle:
            seen.append(np.asarray(rows).copy())
        return make(self, rows)

    monkeypatch.setattr(Batches, "_make", spy)
    return seen


def _spy_term(monkeypatch, cls) -> list[tuple[np.ndarray, np.ndarray]]:
    """(store rows, labelled mask) of every batch a distillation loss term is computed on."""
    calls: list[tuple[np.ndarray, np.ndarray]] = []
    forward = cls.forward

    def spy(self, ctx):
        calls.append((ctx.batch.index.cpu().numpy().copy(), ctx.labelled.cpu().numpy().copy()))
        return forward(self, ctx)

    monkeypatch.setattr(cls, "forward", spy)
    return calls


def _manifest_results(result: dict) -> dict:
    return json.loads((Path(result["dir"]) / "manifest.json").read_text())["results"]


# --------------------------------------------------------------------------- the rule
def test_the_choice_is_a_stable_nested_hash_close_to_the_fraction():
    root = require_utkface()
    records = pd.DataFrame({"path": sorted(p.name for p in root.iterdir() if p.name.endswith(".jpg"))})
    masks = [keeps_label(records, f) for f in FRACTIONS]
    for fraction, mask in zip(FRACTIONS, masks):
        assert abs(mask.mean() - fraction) < 0.015, (fraction, mask.mean())   # ~19k faces
        assert np.array_equal(mask, keeps_label(records, fraction))           # the same on every call
    for smaller, larger in zip(masks, masks[1:]):
        assert not (smaller & ~larger).any()                                  # nested
    assert keeps_label(records, 1.0).all()
    # a face's own key decides, not its position, nor the process (Python's hash seed)
    shuffled = records.sample(frac=1.0, random_state=3)
    assert np.array_equal(keeps_label(shuffled, 0.2), masks[2][shuffled.index.to_numpy()])
    code = ("import sys, pandas as pd; from agecli.store import keeps_label; "
            "paths = sys.stdin.read().split(); "
            "print(''.join('1' if k else '0' for k in keeps_label(pd.DataFrame({'path': paths}), 0.2)))")
    head = records["path"].tolist()[:3000]
    other = subprocess.run([sys.executable, "-c", code], input="\n".join(head), capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert other == "".join("1" if k else "0" for k in masks[2][:3000])


def test_only_the_training_faces_left_out_lose_their_labels(real_run):
    run, _ = real_run
    store = FaceStore.open(run)
    train_rows = store.indices("train")
    hidden = hide_labels(store, train_rows, 0.2)
    kept = _kept(store, 0.2)
    before, after = store.records, hidden.records
    assert 0.1 < len(kept) / len(labelled(store, train_rows)) < 0.3
    # val and test are untouched; every column but the labels is untouched
    untouched = store.indices("val").tolist() + store.indices("test").tolist()
    pd.testing.assert_frame_equal(before.iloc[untouched], after.iloc[untouched])
    pd.testing.assert_frame_equal(before.drop(columns=["age", "age_std", "gender"]),
                                  after.drop(columns=["age", "age_std", "gender"]))
    pd.testing.assert_frame_equal(before.iloc[kept], after.iloc[kept])
    left_out = np.setdiff1d(train_rows, kept)
    assert after["age"].iloc[left_out].isna().all() and (after["gender"].iloc[left_out] == -1).all()
    pd.testing.assert_frame_equal(FaceStore.open(run).records, before)      # a copy: the store is unchanged
    # distill reads the run through this very copy: its labelled training rows (the ranking
    # teacher's of --method ordinal) are the kept ones, its val/test rows the same as before
    opened, _ = _open_store(run, None, 0.2)
    pd.testing.assert_frame_equal(opened.records, after)
    rows, plain = _Rows.of(opened), _Rows.of(store)
    assert np.array_equal(rows.train_labelled, kept) and np.array_equal(rows.train, plain.train)
    assert np.array_equal(rows.val, plain.val) and np.array_equal(rows.test, plain.test)


# --------------------------------------------------------------------------- train
def test_train_trains_on_the_labelled_faces_only_whatever_the_seed(real_run, monkeypatch):
    run, _ = real_run
    store = FaceStore.open(run)
    kept, every = _kept(store, 0.2), labelled(store, store.indices("train"))
    for seed in (0, 1):
        seen = _spy_batches(monkeypatch)
        result = train(run, arch="mobilenet", size=32, name=f"fraction-seed{seed}",
                       options=TrainOptions(epochs=1, labelled_fraction=0.2, seed=seed, **FAST))
        faces = np.concatenate(seen)
        assert set(faces.tolist()) <= set(kept.tolist())
        assert len(faces) >= len(kept) - FAST["batch_size"]   # one epoch: all of them but the last part batch
        counts = {"labelled_fraction": 0.2, "train_faces": len(kept), "labelled_faces": len(kept),
                  "unlabelled_faces": len(every) - len(kept)}
        assert {k: result[k] for k in counts} == counts
        assert {k: _manifest_results(result)[k] for k in counts} == counts
        assert result["test"]["n"] == len(labelled(store, store.indices("test")))  # test untouched
        monkeypatch.undo()


def test_fraction_one_trains_on_the_very_same_rows_as_before(real_run, monkeypatch):
    run, _ = real_run
    store = FaceStore.open(run)
    every = labelled(store, store.indices("train"))
    assert np.array_equal(labelled_subset(store, every, 1.0), every)
    assert hide_labels(store, store.indices("train"), 1.0) is store
    given = []
    fit = train_stage.fit

    def spy(model, spec, store_, train_idx, *args, **kwargs):
        given.append(np.asarray(train_idx).copy())
        return fit(model, spec, store_, train_idx, *args, **kwargs)

    monkeypatch.setattr(train_stage, "fit", spy)
    result = train(run, arch="mobilenet", size=32, name="fraction-one",
                   options=TrainOptions(epochs=1, max_batches=1, **FAST))
    assert np.array_equal(given[0], every)   # same rows, same order: the same batches and model as before
    assert result["labelled_faces"] == result["train_faces"] == len(every) and result["unlabelled_faces"] == 0


# --------------------------------------------------------------------------- distill
def test_distill_soft_teaches_every_face_and_fits_labels_of_the_kept_ones(real_run, monkeypatch):
    run, teacher = real_run
    store = FaceStore.open(run)
    kept, train_rows = _kept(store, 0.2), store.indices("train")
    gt, soft = _spy_term(monkeypatch, losses.GroundTruth), _spy_term(monkeypatch, losses.SoftTarget)
    result = distill(run, teachers=[str(teacher)], student="squeezenet", size=32, method="soft", name="soft-02",
                     options=TrainOptions(epochs=1, augment=False, labelled_fraction=0.2, **FAST))
    taught = np.concatenate([rows for rows, _ in soft])
    assert set(taught.tolist()) <= set(train_rows.tolist())
    assert len(taught) >= len(train_rows) - FAST["batch_size"]   # every training face, labelled or not
    assert len(np.setdiff1d(taught, kept)) > 0.6 * len(train_rows)
    assert len(gt) == len(soft)
    for rows, known in gt:   # the gt term sees exactly the kept faces of each batch as labelled
        assert np.array_equal(known, np.isin(rows, kept)), rows
    assert sum(int(known.sum()) for _, known in gt) == len(np.intersect1d(taught, kept)) > 0
    counts = {"labelled_fraction": 0.2, "train_faces": len(train_rows), "labelled_faces": len(kept),
              "unlabelled_faces": len(train_rows) - len(kept)}
    assert {k: result[k] for k in counts} == counts
    assert {k: _manifest_results(result)[k] for k in counts} == counts
    assert result["metrics"]["student"]["n"] == len(labelled(store, store.indices("test")))


def test_distill_pseudo_labels_the_faces_left_out_without_an_unlabelled_run(real_run, monkeypatch):
    run, teacher = real_run
    store = FaceStore.open(run)
    kept = _kept(store, 0.2)
    options = TrainOptions(epochs=1, max_batches=4, augment=False, **FAST)
    with pytest.raises(AgecliError, match="--labelled-fraction below 1"):
        distill(run, teachers=[str(teacher)], student="squeezenet", size=32, method="pseudo", options=options)
    gt, pseudo = _spy_term(monkeypatch, losses.GroundTruth), _spy_term(monkeypatch, losses.PseudoLabel)
    result = distill(run, teachers=[str(teacher)], student="squeezenet", size=32, method="pseudo", name="pseudo-02",
                     options=TrainOptions(**{**options.to_dict(), "labelled_fraction": 0.2}))
    assert "pseudo" in result["formula"] and result["labelled_faces"] == len(kept)
    pseudo_rows = np.concatenate([rows[~known] for rows, known in pseudo])
    gt_rows = np.concatenate([rows[known] for rows, known in gt])
    assert len(pseudo_rows) and not np.isin(pseudo_rows, kept).any()   # pseudo: the faces left out
    assert len(gt_rows) and np.isin(gt_rows, kept).all()               # gt: the kept ones
    assert json.loads((run / "distill" / "pseudo-02" / "manifest.json").read_text())["status"] == "complete"
