"""Distillation: loss terms, the student wrapper, stores, and the distill stage end to end."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from agecli.modeling.checkpoint import ModelSpec, load_checkpoint, read_checkpoint, save_checkpoint
from agecli.data.batches import Batch
from agecli.stages.distill import ConcatStore, Student, build_loss, distill, listmle, rank_accuracy
from agecli.modeling.encodings import build_encoding, gaussian_targets
from agecli.errors import AgecliError
from agecli.modeling.backbones import build_model
from agecli.store import FaceStore
from agecli.stages.teachers import TeacherOutput
from agecli.options import TrainOptions

from conftest import build_store, synthetic_faces

FAST = dict(batch_size=32, threads=2, workers=2)


def _batch(ages):
    ages = torch.tensor(ages, dtype=torch.float32)
    n = len(ages)
    return Batch(torch.zeros(n, 8, 8, 3, dtype=torch.uint8), ages, torch.full((n,), float("nan")),
                 torch.full((n,), -1), torch.arange(n))


def _log(p):
    return torch.log(p.clamp_min(1e-12))


def _loss(terms, teacher: TeacherOutput | None = None, encoding="ldae", rank: TeacherOutput | None = None):
    loss = build_loss(terms)
    loss.encoding = build_encoding(encoding)
    loss.teacher_feed = (lambda b, x: teacher) if teacher is not None else None
    loss.rank_feed = (lambda b, x: rank) if rank is not None else None
    return loss


# --------------------------------------------------------------------------- loss terms
def test_soft_term_vanishes_when_the_student_matches_the_teacher_and_has_gradients_otherwise():
    z = torch.randn(6, 101) * 2
    teacher = TeacherOutput(torch.zeros(6), torch.softmax(z, 1))
    loss = _loss([("soft", 1.0, {"temperature": 4.0})], teacher)
    value, parts = loss({"age": z.clone()}, _batch([20] * 6), torch.zeros(1))
    assert float(value) == pytest.approx(0.0, abs=1e-5)
    student = torch.zeros(6, 101, requires_grad=True)
    value, parts = loss({"age": student}, _batch([20] * 6), torch.zeros(1))
    assert float(value.detach()) > 0.1 and parts["soft"] == pytest.approx(float(value.detach()))
    value.backward()
    assert student.grad.abs().sum() > 0
    assert "T^2 KL" in loss.formula() and loss.formula().startswith("L = 1 * soft")


def test_soft_term_for_a_regression_student_is_l1_to_the_teacher_age():
    teacher = TeacherOutput(torch.tensor([35.0, 55.0]), gaussian_targets(torch.tensor([35.0, 55.0]), 2.0))
    loss = _loss([("soft", 1.0, {})], teacher, encoding="regression")
    value, _ = loss({"age": torch.tensor([[0.0], [0.0]])}, _batch([1, 1]), torch.zeros(1))
    assert float(value) == pytest.approx((0 + 20 / 20) / 2)


def test_a_groups_student_learns_the_teachers_ages_summed_into_its_groups(teacher_setup):
    """An age teacher (101 ages) and an Adience groups student (8 groups): the soft and pseudo
    targets used to be compared over different supports, and distill crashed mid-epoch."""
    from agecli.labels import group_of_age
    from agecli.stages.distill.losses import on_student_support

    probs = torch.softmax(torch.randn(4, 101), 1)
    grouped = on_student_support(probs, build_encoding("groups"))
    assert grouped.shape == (4, 8) and torch.allclose(grouped.sum(1), torch.ones(4))
    assert float(grouped[0, group_of_age(30.0)]) >= float(probs[0, 30])
    assert on_student_support(probs, build_encoding("ldae")) is probs
    teacher = TeacherOutput(torch.full((4,), 30.0), probs)
    for terms in ([("soft", 1.0, {"temperature": 2.0})], [("pseudo", 1.0, {})]):
        value, _ = _loss(terms, teacher, encoding="groups")({"age": torch.zeros(4, 8, requires_grad=True)},
                                                           _batch([float("nan")] * 4), torch.zeros(1))
        assert torch.isfinite(value) and float(value) > 0
    run, onnx_teacher = teacher_setup
    result = distill(run, teachers=[str(onnx_teacher)], student="squeezenet", size=32, encoding="groups",
                     name="groups_student", options=TrainOptions(epochs=1, max_batches=2, **FAST))
    assert result["metrics"]["student"]["mae"] > 0


def test_gt_and_pseudo_split_labelled_from_unlabelled_faces():
    ages = [30.0, float("nan"), 50.0, float("nan")]
    teacher = TeacherOutput(torch.tensor([0.0, 40.0, 0.0, 60.0]),
                            gaussian_targets(torch.tensor([0.0, 40.0, 0.0, 60.0]), 2.0))
    loss = _loss([("gt", 0.5, {}), ("pseudo", 1.0, {})], teacher)
    perfect = _log(gaussian_targets(torch.tensor([30.0, 40.0, 50.0, 60.0]), 2.0))
    value, parts = loss({"age": perfect}, _batch(ages), torch.zeros(1))
    assert parts["gt"] == pytest.approx(0.0, abs=1e-4) and parts["pseudo"] == pytest.approx(0.0, abs=1e-4)
    # the teacher's 0-year answers on labelled faces are ignored by pseudo
    wrong = _log(gaussian_targets(torch.tensor([30.0, 10.0, 50.0, 10.0]), 2.0))
    _, parts = loss({"age": wrong}, _batch(ages), torch.zeros(1))
    assert parts["gt"] == pytest.approx(0.0, abs=1e-4) and parts["pseudo"] > 1.0
    with pytest.raises(AgecliError, match="unknown distillation loss"):
        build_loss([("dark", 1.0, {})])


def test_hint_adapter_learns_the_teacher_features():
    torch.manual_seed(0)
    f_s = torch.randn(64, 10)
    true_map = torch.randn(10, 4)
    teacher = TeacherOutput(torch.zeros(64), torch.full((64, 101), 1 / 101), f_s @ true_map)
    loss = _loss([("hint", 1.0, {"student_dim": 10, "teacher_dim": 4})], teacher)
    opt = torch.optim.Adam(loss.parameters(), lr=0.05)
    first = None
    for _ in range(200):
        value, _ = loss({"age": torch.zeros(64, 101), "features": f_s}, _batch([1] * 64), torch.zeros(1))
        first = first if first is not None else float(value.detach())
        opt.zero_grad()
        value.backward()
        opt.step()
    assert float(value.detach()) < 0.02 * first


def test_listmle_prefers_the_true_order_and_ordinal_term_follows_the_ranker():
    ages = torch.tensor([10.0, 50.0, 30.0, 70.0, 20.0, 60.0, 40.0, 80.0])
    good = listmle(ages / 10, ages, 4)
    bad = listmle(-ages / 10, ages, 4)
    assert float(good) < float(bad)
    assert listmle(torch.zeros(4), torch.tensor([5.0, 5.0, 5.0, 5.0]), 4) is None  # tied sequences are skipped
    assert rank_accuracy(ages.numpy(), ages.numpy()) == 1.0 and rank_accuracy(-ages.numpy(), ages.numpy()) == 0.0
    # batches arrive sorted by store row, and UTKFace rows by age: sequences must still mix ages.
    # A scorer that only knows the decade ranks random sequences well, but would face tied
    # decades in nearly every run of 4 consecutive ages (loss ~2.8, chance is log 4! = 3.18)
    torch.manual_seed(0)
    sorted_ages = torch.arange(128).float()
    assert float(listmle(5 * (sorted_ages // 10), sorted_ages, 4)) < 1.0
    assert rank_accuracy(np.zeros(8), ages.numpy()) == 0.5

    ranker = TeacherOutput(ages, torch.full((8, 101), 1 / 101), torch.randn(8, 5))
    loss = _loss([("ordinal", 1.0, {"relation": 0.0})], None, rank=ranker)
    ordered = _log(gaussian_targets(ages, 2.0))
    reversed_ = _log(gaussian_targets(90 - ages, 2.0))
    v_good, _ = loss({"age": ordered, "features": torch.randn(8, 3)}, _batch([1] * 8), torch.zeros(1))
    v_bad, _ = loss({"age": reversed_, "features": torch.randn(8, 3)}, _batch([1] * 8), torch.zeros(1))
    # correctly ordered predictions cost nothing (a logistic loss would keep stretching them apart)
    assert float(v_good) == pytest.approx(0.0, abs=1e-6) and float(v_bad) > 1.0


# --------------------------------------------------------------------------- student wrapper, stores
def test_student_wrapper_saves_only_the_student(tmp_path):
    enc = build_encoding("ldae")
    model = build_model("mobilenet_v3_small", enc)
    loss = build_loss([("hint", 1.0, {"student_dim": 1024, "teacher_dim": 8})])
    wrapped = Student(model, loss, layer="backbone.features.3")
    out = wrapped(torch.rand(2, 3, 32, 32))
    assert out["hint_source"].shape == (2, 24)
    assert any("adapter" in n for n, _ in wrapped.named_parameters())  # the optimiser sees the adapter
    spec = ModelSpec(arch="mobilenet_v3_small", encoding=enc.to_dict(), input_size=32)
    save_checkpoint(tmp_path / "s.pt", wrapped, spec)
    reloaded, _ = load_checkpoint(tmp_path / "s.pt")
    assert set(reloaded.state_dict()) == set(model.state_dict())
    assert set(wrapped.state_dict()) == set(model.state_dict())


def test_concat_store_reads_rows_of_both_and_hides_the_unlabelled_labels(tmp_path):
    a_img, a_rec = synthetic_faces(20, 16, seed=1)
    b_img, b_rec = synthetic_faces(30, 16, seed=2)
    a = FaceStore.open(build_store(tmp_path / "a", a_img, a_rec))
    b = FaceStore.open(build_store(tmp_path / "b", b_img, b_rec, dataset="folder"))
    both = ConcatStore.of(a, b)
    assert both.images.shape == (50, 16, 16, 3)
    rows = np.array([3, 19, 20, 49])
    got = both.images[rows]
    assert np.array_equal(got[:2], a_img[[3, 19]]) and np.array_equal(got[2:], b_img[[0, 29]])
    assert both.records["age"].iloc[20:].isna().all() and (both.records["split"].iloc[20:] == "train").all()
    assert both.records["age"].iloc[:20].notna().all()
    alone = ConcatStore.of(None, b)  # its own val/test keep their labels, for scoring only
    train = alone.indices("train")
    assert alone.records["age"].iloc[train].isna().all()
    assert alone.records["age"].iloc[alone.indices("test")].notna().all()


# --------------------------------------------------------------------------- the stage
def brightness_teacher(path):
    """An ONNX teacher that reads the age off a synthetic face's brightness (synthetic_faces paints
    pixel ~ 40 + 1.8 age): nearly an oracle there, and instant. Exposes its pooled input as features."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["pooled"]),
             helper.make_node("Gemm", ["pooled", "W", "B"], ["age"])]
    w = np.full((3, 1), 1 / 3 / 1.8, dtype=np.float32)
    graph = helper.make_graph(nodes, "brightness", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                 ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("age", TensorProto.FLOAT, ["N", 1])],
                              initializer=[numpy_helper.from_array(w, "W"),
                                           numpy_helper.from_array(np.array([-40 / 1.8], np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    path.with_suffix(".json").write_text(json.dumps({"input_size": 32, "mean": [0, 0, 0], "scale": 1.0,
                                                     "output": "age", "sigma": 3.0, "features": "pooled"}))
    return path


@pytest.fixture(scope="module")
def teacher_setup(tmp_path_factory):
    """A synthetic run (age-dependent images) and a teacher that reads their age."""
    root = tmp_path_factory.mktemp("distill")
    images, records = synthetic_faces(240, 32, seed=0)
    run = build_store(root / "run", images, records, dataset="synthetic")
    return run, brightness_teacher(root / "teacher.onnx")


def test_soft_and_hint_teach_the_student_to_agree_with_its_teacher(teacher_setup):
    run, teacher = teacher_setup
    # SqueezeNet has no batch norm, so a few steps already show in eval mode (MobileNet's running
    # statistics need far more steps than a test can afford)
    options = TrainOptions(epochs=4, lr=3e-3, augment=False, **{**FAST, "batch_size": 16})
    result = distill(run, teachers=[str(teacher)], student="squeezenet", size=32, method=["soft", "hint"],
                     alpha=0.0, options=options)
    out = run / "distill" / "squeezenet1_1_from_teacher.onnx"
    assert result["dir"] == str(out)
    for name in ("best.pt", "last.pt", "history.csv", "learning_curve.png", "metrics.json",
                 "recipe.json", "test_predictions.csv", "manifest.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    history = pd.read_csv(out / "history.csv")
    assert {"train_soft", "train_hint"} <= set(history.columns) and "train_gt" not in history.columns
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]

    # the student learnt the teacher: it agrees with it better than a constant guess does
    frame = pd.read_csv(out / "test_predictions.csv")
    metrics = result["metrics"]
    constant = float(np.abs(frame["teacher_age"] - frame["teacher_age"].mean()).mean())
    assert metrics["agreement_mae"] == pytest.approx(float(np.abs(frame["age_pred"] - frame["teacher_age"]).mean()))
    assert metrics["agreement_mae"] < 0.8 * constant, (metrics["agreement_mae"], constant)
    assert metrics["teacher"]["mae"] == pytest.approx(float(np.abs(frame["teacher_age"] - frame["age"]).mean()))
    assert metrics["speed"]["student_ms_per_face"] > 0 and metrics["speed"]["speedup"] > 0

    # self-describing: teachers, method and loss in the provenance; the teacher cache is reused
    model, spec = load_checkpoint(out / "best.pt")
    assert spec.provenance["method"] == ["soft", "hint"]
    assert [t["name"] for t in spec.provenance["loss"]] == ["soft", "hint"]
    assert spec.provenance["teachers"]["path"] == str(teacher) and spec.provenance["teachers"]["kind"] == "onnx"
    assert spec.metrics["test"]["mae"] == pytest.approx(metrics["student"]["mae"])
    assert list((run / "teacher_cache").glob("*.probs.npy"))
    again = distill(run, teachers=[str(teacher)], student="squeezenet", size=32, method=["soft", "hint"], alpha=0.0,
                    options=replace(options, resume=True))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher_cache"]["hit"] is True and manifest["status"] == "complete"
    assert again["name"] == result["name"]


def test_pseudo_ordinal_and_hint_run_with_augmented_live_teachers(teacher_setup, tmp_path):
    run, teacher = teacher_setup
    images, records = synthetic_faces(64, 32, seed=5)
    records["age"] = np.nan
    # framed unlike the labelled run: said as one of the stage's warnings, not as a Python warning
    unl = build_store(tmp_path / "unl", images, records, dataset="folder",
                      alignment={"method": "resize", "size": 32, "margin": 0.1, "template": "utkface"})
    options = TrainOptions(epochs=1, max_batches=2, augment=True, **FAST)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*aligned differently")
        result = distill(run, teachers=[str(teacher)], method="pseudo", unlabelled=unl, size=32, options=options,
                         student="squeezenet")
    assert [w for w in result["warnings"] if w.startswith("the labelled and unlabelled runs are aligned differently")]
    assert [t["name"] for t in read_checkpoint(result["checkpoint"])["spec"]["provenance"]["loss"]] == ["gt", "pseudo"]
    assert "pseudo" in result["formula"] and result["metrics"]["student"]["n"] > 0

    result = distill(run, teachers=[str(teacher)], method=["ordinal", "hint"], size=32, options=options, rank_epochs=1,
                     student="squeezenet")
    rank_dir = run / "distill" / result["name"] / "rank_teacher"
    assert (rank_dir / "rank_teacher.pt").exists()
    assert 0.0 <= result["metrics"]["student"]["mae"] < 200
    spec = read_checkpoint(rank_dir / "rank_teacher.pt")["spec"]
    assert spec["label_space"] == "rank scores" and 0.0 <= spec["metrics"]["rank_accuracy"] <= 1.0
    assert [t["name"] for t in read_checkpoint(result["checkpoint"])["spec"]["provenance"]["loss"]] == \
        ["gt", "soft", "ordinal", "hint"]


def test_bad_input_is_explained(teacher_setup, tmp_path):
    run, teacher = teacher_setup
    images, records = synthetic_faces(40, 32, seed=3)
    records["age"] = np.nan
    unlabelled = build_store(tmp_path / "unl", images, records, dataset="folder")
    opts = TrainOptions(epochs=1, **FAST)
    with pytest.raises(AgecliError, match="no age labels and no --teacher"):
        distill(unlabelled, teachers=[], options=opts)
    with pytest.raises(AgecliError, match="Valid: .*mobilenet_v3_small"):
        distill(run, teachers=[str(teacher)], student="mobilenetz", options=opts)
    with pytest.raises(AgecliError, match="unknown method"):
        distill(run, teachers=[str(teacher)], method="dark", options=opts)
    with pytest.raises(AgecliError, match="needs a teacher"):
        distill(run, teachers=[], method="soft", options=opts)
    with pytest.raises(AgecliError, match="--unlabelled"):
        distill(run, teachers=[str(teacher)], method="pseudo", options=opts)
    with pytest.raises(AgecliError, match="larger than"):
        distill(run, teachers=[str(teacher)], size=64, options=opts)


def test_cli_distill_json(teacher_setup):
    from typer.testing import CliRunner

    from agecli.cli.app import app

    run, teacher = teacher_setup
    result = CliRunner().invoke(app, ["distill", "--run", str(run), "--teacher", str(teacher), "--size", "32", "--student", "squeezenet",
                                      "--epochs", "1", "--batch-size", "32", "--no-augment", "--name", "cli",
                                      "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["name"] == "cli" and "student" in payload["metrics"] and "agreement_mae" in payload["metrics"]


def test_hint_resume_continues_exactly_with_its_learned_adapter(teacher_setup):
    run, teacher = teacher_setup
    options = TrainOptions(epochs=2, lr=3e-3, augment=False, max_batches=2, **{**FAST, "batch_size": 16})
    kwargs = dict(teachers=[str(teacher)], student="squeezenet", size=32, method=["hint"], alpha=0.5)
    distill(run, name="hint_straight", options=options, **kwargs)

    class Interrupt(Exception):
        pass

    def stop_in_epoch_2(task, done, total):
        if task.startswith("epoch 2"):
            raise Interrupt

    with pytest.raises(Interrupt):
        distill(run, name="hint_resumed", options=options, progress=stop_in_epoch_2, **kwargs)
    state = read_checkpoint(run / "distill" / "hint_resumed" / "last.pt")["training_state"]
    assert any(key.endswith("adapter.weight") for key in state["loss_state"])
    distill(run, name="hint_resumed", options=replace(options, resume=True), **kwargs)
    a = read_checkpoint(run / "distill" / "hint_straight" / "last.pt")
    b = read_checkpoint(run / "distill" / "hint_resumed" / "last.pt")
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for key, value in a["training_state"]["loss_state"].items():
        assert torch.equal(value, b["training_state"]["loss_state"][key]), key


def test_teacher_views_label_each_crop_once_and_replay_it_exactly(teacher_setup, tmp_path):
    from agecli.data.batches import apply_augment
    from agecli.stages.distill import TeacherViews
    from agecli.stages.teachers import load_teacher

    run, path = teacher_setup
    store = FaceStore.open(run)
    teacher = load_teacher(str(path))
    teacher.bind(store.manifest.get("alignment"), store.size, dataset=store.dataset)
    faces_seen = []
    forward = teacher._forward
    teacher._forward = lambda x: (faces_seen.append(len(x)), forward(x))[1]
    rows = store.indices("train")
    views = TeacherViews(teacher, store, rows, 3, tmp_path, view_size=32, batch_size=64)
    assert sum(faces_seen) == 3 * len(rows) and views.built == 3

    # the brightness teacher's answer moves with the photometric jitter: views of a face differ
    assert float(views.age.std(0).mean()) > 0.5
    # a drawn crop, made again from the stored numbers, gets the stored answer
    pick = torch.from_numpy(np.sort(rows[:20]))
    view_id, params = views.draw(pick, torch.Generator().manual_seed(1))
    assert len(set(view_id.tolist())) > 1
    images = torch.from_numpy(np.ascontiguousarray(store.images[pick.numpy()]))
    replay = teacher(apply_augment(images.permute(0, 3, 1, 2).float() / 255, 32, params))
    batch = Batch(images, torch.zeros(20), torch.zeros(20), torch.zeros(20), pick, view_id=view_id)
    stored = views(batch, torch.zeros(1))
    assert torch.allclose(stored.age, replay.age, atol=1e-3)
    assert torch.allclose(stored.probs, replay.probs, atol=1e-5)

    # a larger bank keeps the views already labelled and labels only the new one
    faces_seen.clear()
    more = TeacherViews(teacher, store, rows, 4, tmp_path, view_size=32, batch_size=64)
    assert more.built == 1 and sum(faces_seen) == len(rows)
    assert torch.equal(more.params[:3], views.params) and torch.equal(more.age[:3], views.age)
    # a view whose stored crops are not the ones drawn now is labelled again, never trusted
    first = next(tmp_path.glob("*.view0.params.npy"))
    np.save(first, np.load(first) * 0.9)
    faces_seen.clear()
    assert TeacherViews(teacher, store, rows, 4, tmp_path, view_size=32, batch_size=64).built == 1
    assert sum(faces_seen) == len(rows)


def test_distill_with_teacher_views_trains_on_the_bank(teacher_setup):
    run, teacher = teacher_setup
    options = TrainOptions(epochs=2, max_batches=3, augment=True, **FAST)
    result = distill(run, teachers=[str(teacher)], student="squeezenet", size=32, teacher_views=2,
                     name="views", options=options)
    out = run / "distill" / "views"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["teacher_cache"]["views"] == 2
    assert manifest["teacher_cache"]["built"] == 2 and manifest["teacher_cache"]["seconds"] > 0
    assert json.loads((out / "recipe.json").read_text())["teacher_inputs"] == "a bank of 2 augmented views per face"
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 2 and np.isfinite(history["train_soft"]).all() and history["train_soft"].iloc[0] > 0
    assert result["metrics"]["student"]["n"] > 0 and len(list((run / "teacher_cache").glob("*.view1.age.npy"))) == 1
    first_key = manifest["teacher_cache"]["key"]

    # another seed is another student, not another bank: it reuses the teacher's answers
    again = distill(run, teachers=[str(teacher)], student="squeezenet", size=32, teacher_views=2,
                    name="views_seed1", options=replace(options, seed=1))
    manifest = json.loads((run / "distill" / again["name"] / "manifest.json").read_text())
    assert manifest["teacher_cache"]["built"] == 0 and manifest["status"] == "complete"

    # --teacher-mirror: a bank of its own, the teacher described as mirrored in the student's checkpoint
    mirrored = distill(run, teachers=[str(teacher)], student="squeezenet", size=32, teacher_views=2,
                       teacher_mirror=True, name="views_mirror", options=options)
    manifest = json.loads((run / "distill" / "views_mirror" / "manifest.json").read_text())
    assert manifest["teacher_cache"]["built"] == 2 and manifest["teacher_cache"]["key"] != first_key
    spec = read_checkpoint(run / "distill" / "views_mirror" / "best.pt")["spec"]
    assert spec["provenance"]["teachers"]["mirror"] is True and mirrored["metrics"]["student"]["n"] > 0
    # the brightness teacher is symmetric: on mirror images it answers the same, so the two banks agree
    plain_ages = np.load(next((run / "teacher_cache").glob(f"{first_key}.view1.age.npy")))
    mirror_ages = np.load(next((run / "teacher_cache").glob(f"{manifest['teacher_cache']['key']}.view1.age.npy")))
    assert np.allclose(plain_ages, mirror_ages, atol=1e-3)

    with pytest.raises(AgecliError, match="hint needs the teacher.s features live"):
        distill(run, teachers=[str(teacher)], method=["soft", "hint"], size=32, teacher_views=2, options=options)
    with pytest.raises(AgecliError, match="--no-augment"):
        distill(run, teachers=[str(teacher)], size=32, teacher_views=2, options=replace(options, augment=False))


# --------------------------------------------------------------------------- mirror pairs
def _js(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence of two rows of logits, from its definition."""
    p, q = torch.softmax(a, 1), torch.softmax(b, 1)
    m = (p + q) / 2
    return 0.5 * ((p * (_log(p) - _log(m))).sum(1) + (q * (_log(q) - _log(m))).sum(1))


def test_mirror_term_is_the_js_divergence_between_a_crop_and_its_mirror_image():
    z = torch.randn(4, 101) * 2
    loss = _loss([("mirror", 1.0, {})])
    value, _ = loss({"age": torch.cat([z, z])}, _batch([20] * 8), torch.zeros(1))
    assert float(value) == pytest.approx(0.0, abs=1e-6)      # both sides answer alike: nothing to pull
    other = (torch.randn(4, 101) * 2).requires_grad_()
    value, parts = loss({"age": torch.cat([z, other])}, _batch([20] * 8), torch.zeros(1))
    assert float(value.detach()) == pytest.approx(float(_js(z, other.detach()).mean()), rel=1e-4)
    assert parts["mirror"] > 0.01
    value.backward()
    assert other.grad.abs().sum() > 0
    # a regression student: the L1 between its two outputs (the units of its own loss)
    outputs = torch.tensor([[1.0], [3.0], [1.3], [2.5]])
    value, _ = _loss([("mirror", 1.0, {})], encoding="regression")({"age": outputs}, _batch([20] * 4),
                                                                    torch.zeros(1))
    assert float(value) == pytest.approx(0.4)
    with pytest.raises(RuntimeError, match="mirror pairs"):
        loss({"age": z[:3]}, _batch([20] * 3), torch.zeros(1))


def test_mirror_pairs_follow_each_crop_with_its_mirror_image(teacher_setup, tmp_path):
    from agecli.data.batches import Augment
    from agecli.engine.loop import Preprocess
    from agecli.stages.distill import TeacherViews
    from agecli.stages.distill.feeds import CropForTeacher, MirrorPairs
    from agecli.stages.teachers import load_teacher

    run, path = teacher_setup
    store = FaceStore.open(run)
    teacher = load_teacher(str(path))
    teacher.bind(store.manifest.get("alignment"), store.size, dataset=store.dataset)
    rows = np.sort(store.indices("train")[:12])
    views = TeacherViews(teacher, store, rows, 2, tmp_path, view_size=32, batch_size=64)
    images = torch.from_numpy(np.ascontiguousarray(store.images[rows]))
    batch = Batch(images, torch.arange(12.0), torch.ones(12), torch.zeros(12, dtype=torch.long),
                  torch.from_numpy(rows))
    prep = Preprocess(24, (0.5,) * 3, (0.25,) * 3, "cpu", Augment(), channels_last=False, robust=0.5)

    paired, x = MirrorPairs(views.make_input)(batch, torch.Generator().manual_seed(0), prep)
    assert x.shape == (24, 3, 24, 24) and torch.equal(x[12:], x[:12].flip(-1))
    assert torch.equal(paired.index, torch.cat([batch.index, batch.index]))
    assert torch.equal(paired.age, torch.cat([batch.age, batch.age])) and len(paired) == 24
    assert torch.equal(paired.view_id[12:], paired.view_id[:12]) and torch.equal(paired.degraded[12:],
                                                                                  paired.degraded[:12])
    # the bank answers both sides with the crop's answer (exact for a mirrored teacher)
    answers = views(paired, x)
    assert torch.equal(answers.age[12:], answers.age[:12])
    # a live teacher's clean crop is mirrored with the student's input: it answers each side
    paired, x = MirrorPairs(CropForTeacher(32))(batch, torch.Generator().manual_seed(0), prep)
    assert paired.view.shape == (24, 3, 32, 32) and torch.equal(paired.view[12:], paired.view[:12].flip(-1))


def test_the_mirror_term_makes_a_network_answer_real_faces_and_their_mirror_images_alike():
    from conftest import utkface_faces
    from agecli.modeling.zoo import resolve_model_ref

    # the shipped default answers a face and its mirror image about a year apart
    model, spec = load_checkpoint(resolve_model_ref("default"))
    images, _ = utkface_faces(48, spec.input_size, seed=3)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    encoding, loss = spec.build_encoding(), _loss([("mirror", 1.0, {})], encoding=spec.encoding["name"])
    model.eval()   # batch norm keeps its statistics: only the weights learn the symmetry

    def answers() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return encoding.predict(model(x)["age"]), encoding.predict(model(x.flip(-1))["age"])

    plain, mirrored = answers()
    before, spread = float((plain - mirrored).abs().mean()), float(plain.std())
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(10):
        value, _ = loss(model(torch.cat([x, x.flip(-1)])), _batch([20] * 96), x)
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
    plain, mirrored = answers()
    after = float((plain - mirrored).abs().mean())
    assert before > 0.5 and after < 0.5 * before, (before, after)
    assert float(plain.std()) > 0.8 * spread   # symmetric, not collapsed onto one answer


def test_distill_with_mirror_pairs_trains_on_both_sides(teacher_setup):
    run, teacher = teacher_setup
    options = TrainOptions(epochs=2, max_batches=3, augment=True, **{**FAST, "batch_size": 16})
    result = distill(run, teachers=[str(teacher)], student="squeezenet", size=32, teacher_views=2,
                     teacher_mirror=True, mirror_pairs=True, name="pairs", options=options)
    out = run / "distill" / "pairs"
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["teacher_inputs"] == "a bank of 2 augmented views per face, each crop with its mirror image"
    assert [(t["name"], t["weight"]) for t in recipe["loss"]["terms"]][-1] == ("mirror", 4.0)
    history = pd.read_csv(out / "history.csv")
    assert np.isfinite(history["train_mirror"]).all() and result["metrics"]["student"]["n"] > 0
    assert read_checkpoint(out / "best.pt")["spec"]["provenance"]["loss"][-1]["name"] == "mirror"
    # a live teacher sees each side itself: no mirrored teacher needed
    live = distill(run, teachers=[str(teacher)], student="squeezenet", size=32, mirror_pairs=True,
                   mirror_weight=1.0, name="pairs_live", options=options)
    assert live["metrics"]["student"]["n"] > 0
    # stored answers hold for the crop alone unless the teacher answers both sides alike
    with pytest.raises(AgecliError, match="--teacher-mirror"):
        distill(run, teachers=[str(teacher)], size=32, teacher_views=2, mirror_pairs=True, options=options)
    with pytest.raises(AgecliError, match="--teacher-mirror"):
        distill(run, teachers=[str(teacher)], size=32, mirror_pairs=True, options=replace(options, augment=False))


def test_a_run_started_before_an_option_existed_resumes_and_a_changed_option_is_refused(teacher_setup):
    """A run interrupted under an older agecli records no value for options added since; it had
    their defaults, so resuming it is no change (it was refused: 'config ... differ')."""
    run, teacher = teacher_setup
    options = TrainOptions(epochs=1, max_batches=2, augment=True, **FAST)
    distill(run, teachers=[str(teacher)], student="squeezenet", size=32, teacher_views=2, name="older",
            options=options)
    manifest = run / "distill" / "older" / "manifest.json"
    record = json.loads(manifest.read_text())
    for added in ("mirror_pairs", "mirror_weight", "teacher_mirror"):
        del record["args"]["config"][added]
    del record["args"]["options"]["robust_augment"]
    manifest.write_text(json.dumps(record))
    with pytest.raises(AgecliError, match=r"differ from its start: --mirror-weight 4\.0 -> 2\.0\. Give them"):
        distill(run, teachers=[str(teacher)], student="squeezenet", size=32, teacher_views=2, name="older",
                mirror_weight=2.0, options=replace(options, resume=True, epochs=2))
    resumed = distill(run, teachers=[str(teacher)], student="squeezenet", size=32, teacher_views=2, name="older",
                      options=replace(options, resume=True, epochs=2))
    assert resumed["last_epoch"] == 2 and json.loads(manifest.read_text())["status"] == "complete"


def test_distill_options_are_one_source_for_keywords_and_validation():
    from agecli.options import DistillOptions

    assert DistillOptions(method="soft").method == ("soft",)
    assert DistillOptions(method=["soft", "hint", "soft"]).to_dict()["method"] == ["soft", "hint"]
    with pytest.raises(AgecliError, match="unknown method"):
        DistillOptions(method=["dark"])
    with pytest.raises(AgecliError, match="--teacher-views -1 is out of range"):
        DistillOptions(teacher_views=-1)
    with pytest.raises(AgecliError, match="--rank-k"):
        DistillOptions(rank_k=1)
    # distill's keywords are the dataclass's fields: a typo is caught before anything runs
    with pytest.raises(TypeError, match="tempreature"):
        distill(None, tempreature=2.0)


def test_a_pretrained_student_sees_its_input_normalised_as_train_gives_it(teacher_setup):
    """dlib's weights expect (pixel - mean) / 256; fed ImageNet-normalised input (4x the scale)
    a distilled dlib student started far from its pretrained function, unlike its train twin."""
    from agecli.modeling.backbones import default_normalisation
    from agecli.stages.distill.feeds import LiveTeacher
    from agecli.stages.train import train

    run, teacher = teacher_setup
    options = TrainOptions(epochs=1, max_batches=1, augment=False, **{**FAST, "batch_size": 16})
    distilled = distill(run, teachers=[str(teacher)], student="dlib_resnet6", pretrained="dlib", size=32,
                        method="soft", options=options, name="dlib6_norm")
    trained = train(run, arch="dlib_resnet6", pretrained="dlib", size=32, options=options, name="dlib6_norm_twin")
    _, d_spec = load_checkpoint(distilled["checkpoint"])
    _, t_spec = load_checkpoint(Path(trained["dir"]) / "best.pt")
    norm = default_normalisation("dlib_resnet6")
    assert (d_spec.mean, d_spec.std) == (t_spec.mean, t_spec.std) == norm

    # the live teacher un-normalises the student's input with those numbers: it sees the face itself
    seen = []
    live = LiveTeacher(lambda x01: seen.append(x01) or TeacherOutput(torch.zeros(len(x01)), torch.zeros(len(x01), 101)), *norm)
    x01 = torch.rand(2, 3, 32, 32)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
    live(None, (x01 - mean) / std)
    assert torch.allclose(seen[0], x01, atol=1e-6)
