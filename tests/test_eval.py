"""`agecli eval`: metrics that match the predictions, files, warnings and bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from agecli.modeling.checkpoint import ModelSpec, save_checkpoint
from agecli.modeling.encodings import build_encoding
from agecli.errors import AgecliError
from agecli.engine.metrics import age_metrics
from agecli.stages.evaluate import evaluate
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
