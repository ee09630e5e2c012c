"""`agecli eval`: metrics that match the predictions, files, warnings and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agecli.modeling.checkpoint import ModelSpec, read_seen, save_checkpoint
from agecli.modeling.encodings import build_encoding
from agecli.errors import AgecliError
from agecli.engine.metrics import age_metrics
from agecli.options import TrainOptions
from agecli.stages.bench import bench
from agecli.stages.distill import distill
from agecli.stages.evaluate import evaluate
from agecli.stages.train import train
from agecli.modeling.backbones import build_model
from agecli.store import FaceStore

from conftest import build_store, synthetic_faces


def _checkpoint(path, run, encoding="ldae", gender=True, alignment=None):
    torch.manual_seed(0)
    enc = build_encoding(encoding)
    model = build_model("mobilenet_v3_small", enc, gender=gender)
    store = FaceStore.open(run)
    spec = ModelSpec(arch="mobilenet_v3_small", encoding=enc.to_dict(), input_size=32, gender=gender,
                     alignment=alignment or store.alignment.to_dict(), provenance={"dataset": "synthetic"})
    return save_checkpoint(path, model, spec)


def test_eval_writes_predictions_metrics_and_bias(synthetic_run, tmp_path):
    model = _checkpoint(tmp_path / "m.pt", synthetic_run)
    result = evaluate(model, synthetic_run, "test")
    out = synthetic_run / "eval" / "m"
    assert result["dir"] == str(out) and result["warnings"] == []
    frame = pd.read_csv(out / "predictions.csv")
    rec = FaceStore.open(synthetic_run).records
    assert len(frame) == (rec["split"] == "test").sum() == result["metrics"]["n"]
    # the metrics are exactly those of the written predictions
    again = age_metrics(frame["age_pred"], frame["age"])
    for key in ("mae", "rmse", "cs1", "cs5", "cs10"):
        assert result["metrics"][key] == pytest.approx(again[key])
    assert result["metrics"]["gender_accuracy"] == pytest.approx((frame["gender_pred"] == frame["gender"]).mean())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mae"] == pytest.approx(result["metrics"]["mae"])
    bias = pd.read_csv(out / "bias.csv")
    assert set(bias["by"]) == {"age", "gender", "race"}
    male = frame[frame["gender"] == 0]
    row = bias[(bias["by"] == "gender") & (bias["value"] == "male")].iloc[0]
    assert row["mae"] == pytest.approx((male["age_pred"] - male["age"]).abs().mean())
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    # --split all: every labelled face
    assert evaluate(model, synthetic_run, "all")["metrics"]["n"] == len(rec)


def test_eval_and_distill_say_when_faces_scored_or_hidden_were_learned_from(synthetic_run, tmp_path):
    """A model records the faces it learned from; the same images prepared with another split
    put some of them in the test split, and eval counts them."""
    fast = TrainOptions(epochs=1, batch_size=32, workers=0, threads=1, max_batches=2)
    trained = train(synthetic_run, arch="mobilenet_v3_small", size=32, encoding="regression", options=fast)
    store = FaceStore.open(synthetic_run)
    train_contents = set(store.records.loc[store.records["split"] == "train", "content"])
    reshuffled = store.records.copy()
    reshuffled["split"] = np.random.default_rng(7).permutation(reshuffled["split"].to_numpy())
    other = build_store(tmp_path / "resplit", np.asarray(store.images), reshuffled, dataset="synthetic")

    expected = int(reshuffled.loc[reshuffled["split"] == "test", "content"].isin(train_contents).sum())
    assert 0 < expected < (reshuffled["split"] == "test").sum()
    warnings = evaluate(trained["best"], other, "test")["warnings"]
    assert [w for w in warnings if "learned from" in w] == [
        f"{expected} of the {(reshuffled['split'] == 'test').sum()} faces scored (test) are faces this model or its "
        "teachers learned from (the checkpoint records them by image content), so this score is optimistic. Score "
        "it on faces it never saw: a run prepared from other images, or with the split (and fold) it was trained on."]
    assert not [w for w in evaluate(trained["best"], synthetic_run, "test")["warnings"] if "learned from" in w]
    benched = bench(other, models=[trained["best"]], include_reference=False, backends=["eager"], batch_sizes=[1],
                    warmup=1, repeats=2, report=False, device="cpu")
    assert [row["test_seen"] for row in benched["table"]] == [expected]

    # a student taught by it on the re-split run: the teacher saw its test faces and the labels it hides
    student = distill(other, teachers=[trained["best"]], student="mobilenet_v3_small", size=32,
                      encoding="regression", options=TrainOptions(**{**fast.to_dict(), "labelled_fraction": 0.5}))
    leaks = [w for w in student["warnings"] if w.startswith("teacher ")]
    assert len(leaks) == 2 and leaks[0].startswith(f"teacher {trained['best']} learned from {expected} of the run's")
    assert leaks[1].startswith(f"teacher {trained['best']} learned the labels of ")
    assert "whose labels --labelled-fraction hides from the student" in leaks[1]
    # and the student's own record holds what it and its teacher learned from
    seen = read_seen(student["checkpoint"])
    assert len(seen.faces) == len(set(train_contents) | set(reshuffled.loc[reshuffled["split"] == "train", "content"]))
    last = read_seen(Path(student["checkpoint"]).with_name("last.pt"))   # an interrupted run's files say it too
    assert np.array_equal(last.faces, seen.faces) and np.array_equal(last.labels, seen.labels)
    assert len(seen.labels) < len(seen.faces)   # the hidden labels are not among those it learned


def test_what_a_model_learned_from_passes_through_students_and_init(synthetic_run):
    """A student distilled at the teacher's --labelled-fraction saw the hidden faces' images but
    learned none of their labels, so teaching a third model from it leaks nothing; weights
    started from another model carry what that model learned from."""
    half = TrainOptions(epochs=1, batch_size=32, workers=0, threads=1, max_batches=2, labelled_fraction=0.5)
    teacher = train(synthetic_run, arch="mobilenet_v3_small", size=32, encoding="regression", options=half)
    first = distill(synthetic_run, teachers=[teacher["best"]], student="mobilenet_v3_small", size=32,
                    encoding="regression", options=half)
    second = distill(synthetic_run, teachers=[first["checkpoint"]], student="mobilenet_v3_small", size=32,
                     encoding="regression", options=half)
    assert not [w for w in first["warnings"] + second["warnings"] if w.startswith("teacher ")]
    taught, own = read_seen(first["checkpoint"]), read_seen(teacher["best"])
    assert len(taught.faces) > len(taught.labels) == len(own.labels)   # every training image; half the labels
    started = train(synthetic_run, arch="mobilenet_v3_small", size=32, encoding="regression", init=first["checkpoint"],
                    options=TrainOptions(epochs=1, batch_size=32, workers=0, threads=1, max_batches=2,
                                         labelled_fraction=0.25))
    inherited = read_seen(started["best"])
    assert np.array_equal(inherited.faces, taught.faces) and np.array_equal(inherited.labels, taught.labels)


def test_an_eval_of_another_model_under_a_taken_name_says_it_replaces_it(synthetic_run, tmp_path, capsys):
    first, second = _checkpoint(tmp_path / "m.pt", synthetic_run), _checkpoint(tmp_path / "n.pt", synthetic_run)
    evaluate(first, synthetic_run, name="x")
    evaluate(first, synthetic_run, name="x")          # the same model again: nothing to say
    assert "replaced" not in capsys.readouterr().err
    evaluate(second, synthetic_run, name="x")
    said = " ".join(capsys.readouterr().err.split())
    assert f"held an eval of {first}; it is replaced by this one of {second}" in said


def test_eval_warns_on_alignment_mismatch_and_scores_groups_models(synthetic_run, tmp_path):
    other = {"method": "similarity", "size": 128, "margin": 0.4, "template": "arcface5"}
    result = evaluate(_checkpoint(tmp_path / "a.pt", synthetic_run, alignment=other), synthetic_run)
    assert any("aligned differently" in w and "template" in w for w in result["warnings"])
    groups = evaluate(_checkpoint(tmp_path / "g.pt", synthetic_run, encoding="groups", gender=False), synthetic_run)
    assert {"group_exact", "group_1off"} <= set(groups["metrics"]) and any("groups model" in w for w in groups["warnings"])
    assert groups["metrics"]["group_1off"] >= groups["metrics"]["group_exact"]


def test_eval_bad_input(synthetic_run, tmp_path):
    model = _checkpoint(tmp_path / "m.pt", synthetic_run)
    images, records = synthetic_faces(20, 32)
    folder = build_store(tmp_path / "folder", images, records.assign(age=np.nan), dataset="folder")
    with pytest.raises(AgecliError, match="nothing to score"):
        evaluate(model, folder)
    only_train = build_store(tmp_path / "train_only", images, records.assign(split="train"))
    with pytest.raises(AgecliError, match="no labelled faces"):
        evaluate(model, only_train, "test")
    with pytest.raises(AgecliError, match="unknown split"):
        evaluate(model, only_train, "holdout")
    (tmp_path / "junk.pt").write_text("not a model")
    with pytest.raises(AgecliError):
        evaluate(tmp_path / "junk.pt", synthetic_run)


def test_cli_eval_json(synthetic_run, tmp_path):
    from typer.testing import CliRunner

    from agecli.cli.app import app

    model = _checkpoint(tmp_path / "best.pt", synthetic_run)
    out = CliRunner().invoke(app, ["eval", "--model", str(model), "--run", str(synthetic_run), "--split", "val", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["split"] == "val" and result["metrics"]["n"] > 0
    assert (synthetic_run / "eval" / f"{tmp_path.name}-best-val" / "metrics.json").exists()


def test_eval_mirror_scores_each_face_as_the_mean_over_it_and_its_mirror_image(tiny_run, tmp_path):
    # the shipped student on real faces: a trained network answers a face and its mirror image differently
    plain = evaluate("default", tiny_run, "test")
    mirrored = evaluate("default", tiny_run, "test", mirror=True)
    assert mirrored["dir"] == str(tiny_run / "eval" / "default-mirror") and mirrored["mirror"] is True
    assert plain["mirror"] is False and (tiny_run / "eval" / "default" / "metrics.json").exists()
    one = pd.read_csv(tiny_run / "eval" / "default" / "predictions.csv")
    both = pd.read_csv(tiny_run / "eval" / "default-mirror" / "predictions.csv")
    # the same faces mirrored, scored plainly
    flipped_run = tmp_path / "flipped"
    store = FaceStore.open(tiny_run)
    build_store(flipped_run, np.ascontiguousarray(store.images[:, :, ::-1]), store.records)
    evaluate("default", flipped_run, "test")
    other = pd.read_csv(flipped_run / "eval" / "default" / "predictions.csv")
    assert (one["age_pred"] - other["age_pred"]).abs().mean() > 0.3   # measured about 1.2 years
    assert np.allclose(both["age_pred"], (one["age_pred"] + other["age_pred"]) / 2, atol=1e-4)
    assert np.allclose(both["female_prob"], (one["female_prob"] + other["female_prob"]) / 2, atol=1e-5)
    # ... so mirroring the faces changes nothing under --mirror
    evaluate("default", flipped_run, "test", mirror=True)
    again = pd.read_csv(flipped_run / "eval" / "default-mirror" / "predictions.csv")
    assert np.allclose(again["age_pred"], both["age_pred"], atol=1e-4)
    metrics = age_metrics(both["age_pred"], both["age"])
    assert mirrored["metrics"]["mae"] == pytest.approx(metrics["mae"])
    # a groups model: the likeliest group of the summed probabilities, its midpoint as the age
    groups = _checkpoint(tmp_path / "g.pt", tiny_run, encoding="groups")
    result = evaluate(groups, tiny_run, "test", mirror=True)
    frame = pd.read_csv(Path(result["dir"]) / "predictions.csv")
    assert frame["group_pred"].between(0, 7).all() and result["metrics"]["n"] == len(one)
