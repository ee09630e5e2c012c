"""The model shipped inside agecli: its card, the names `default` and `dlib-age` wherever a
model is accepted, and a wheel that carries it with the recipes and the sample."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agecli.errors import AgecliError
from agecli.modeling.checkpoint import load_checkpoint
from agecli.modeling.zoo import MODEL_CARD, WEIGHTS_DIR, default_model_path, resolve_checkpoint, resolve_model_ref

REPO = Path(__file__).resolve().parents[1]


def test_the_default_model_is_a_checkpoint_with_its_card():
    path = default_model_path()
    assert path == WEIGHTS_DIR / "default.pt" and path.stat().st_size < 20 * 2 ** 20  # a few MB
    model, spec = load_checkpoint(path)
    assert spec.gender and spec.build_encoding().support == "ages"
    card = MODEL_CARD.read_text()
    assert "non-commercial research" in card and "UTKFace" in card
    for section in ("## Figures", "## Input and alignment", "## Intended use", "## Limits"):
        assert section in card
    # the card's figures are those the checkpoint records about itself
    test = spec.metrics["test"]
    assert f"**{test['mae']:.2f} years**" in card and f"{test['gender_accuracy']:.3f}" in card
    assert f"{sum(p.numel() for p in model.parameters()):,}" in card and spec.arch in card
    assert re.search(rf"\b{spec.input_size} x {spec.input_size} RGB", card)


def test_its_teachers_graphs_rebuild_from_its_provenance(tmp_path):
    """benchmarks/student_latency.py --teacher-graphs times the default against networks built
    from what its checkpoint says of its teachers (their files are not shipped): two
    dlib_facerec at 150 px, the 5.60 M parameters of the teacher rows in docs/results.md."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("student_latency", REPO / "benchmarks" / "student_latency.py")
    bench_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_script)
    paths = bench_script.teacher_graphs("default", tmp_path)
    assert len(paths) == 2 and all(Path(p).is_relative_to(tmp_path) for p in paths)
    for path in paths:
        model, graph = load_checkpoint(path)
        assert (graph.arch, graph.input_size, graph.gender) == ("dlib_facerec", 150, True)
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 5.60
    from agecli.modeling.checkpoint import save_checkpoint

    student, student_spec = load_checkpoint(default_model_path())
    student_spec.provenance = {}  # a model trained without a teacher names none
    save_checkpoint(tmp_path / "plain.pt", student, student_spec)
    with pytest.raises(SystemExit, match="names no checkpoint teachers"):
        bench_script.teacher_graphs(str(tmp_path / "plain.pt"), tmp_path / "none")


def test_it_names_no_machine_path_and_ship_model_makes_sure(tmp_path):
    """Shipped, the default names its run and teachers relative to the recipe's run folder;
    tools/ship_model.py rewrites a run's absolute paths so, and refuses any other."""
    import importlib.util

    import torch

    from agecli.modeling.checkpoint import read_checkpoint

    spec = importlib.util.spec_from_file_location("ship_model", REPO / "tools" / "ship_model.py")
    ship_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship_model)
    assert ship_model.absolute_paths(read_checkpoint(default_model_path())["spec"]) == []

    run = tmp_path / "somewhere" / "run"
    payload = read_checkpoint(default_model_path())
    provenance = payload["spec"]["provenance"]
    provenance["run"] = str(run)
    provenance["args"]["teachers"] = [str(run / "train" / "teacher_facerec" / "best.pt")]
    torch.save(payload, tmp_path / "trained.pt")
    rewritten = ship_model.ship(tmp_path / "trained.pt", run, "runs/mine", tmp_path / "shipped.pt")
    assert rewritten == [str(run), str(run / "train" / "teacher_facerec" / "best.pt")]
    shipped = read_checkpoint(tmp_path / "shipped.pt")
    assert shipped["spec"]["provenance"]["run"] == "runs/mine"
    assert shipped["spec"]["provenance"]["args"]["teachers"] == ["runs/mine/train/teacher_facerec/best.pt"]
    assert torch.equal(shipped["seen_faces"], payload["seen_faces"])
    model, _ = load_checkpoint(tmp_path / "shipped.pt")
    assert all(torch.equal(v, payload["state_dict"][k]) for k, v in model.state_dict().items())
    with pytest.raises(SystemExit, match="absolute paths outside"):
        ship_model.ship(tmp_path / "trained.pt", tmp_path / "elsewhere", "runs/mine", tmp_path / "refused.pt")
    assert not (tmp_path / "refused.pt").exists()


def test_names_resolve_in_one_place(tmp_path):
    assert resolve_model_ref("default") == default_model_path()
    assert resolve_model_ref("dlib-age") == "dlib-age"
    assert resolve_model_ref(tmp_path / "m.pt") == tmp_path / "m.pt"
    assert resolve_checkpoint("default") == default_model_path()
    with pytest.raises(AgecliError, match="--models dlib-age: the CC0 dlib model is an ONNX model"):
        resolve_checkpoint("dlib-age", option="--models")


def test_eval_bench_and_distill_take_the_name_default(tiny_run):
    from agecli.stages.bench.candidates import candidates
    from agecli.stages.evaluate import evaluate
    from agecli.stages.teachers import build_teacher

    _, spec = load_checkpoint(default_model_path())
    result = evaluate("default", tiny_run, split="all")
    assert result["arch"] == spec.arch and result["metrics"]["n"] == 300 and result["metrics"]["mae"] < 15
    cands = candidates(tiny_run, ["default", "dlib-age"])
    assert [(c.name, c.path) for c in cands] == [("default", default_model_path()), ("dlib-age", None)]
    teacher = build_teacher(["default"])
    assert teacher.kind == "checkpoint" and teacher.input_size == spec.input_size
    with pytest.raises(AgecliError, match="ONNX model, not an agecli checkpoint"):
        evaluate("dlib-age", tiny_run)


@pytest.mark.slow
@pytest.mark.shared_data
def test_eval_of_the_default_counts_the_utkface_faces_it_trained_on(tmp_path):
    """The default records its 13,401 training faces by content. prepare's split of an image
    depends on the seed, not on which other images are prepared, so 600 faces prepared with
    the default's seed 0 split as for the default: its train faces all count, its test faces
    none. With seed 1 about 70 % of any split were the default's training faces."""
    from conftest import require_utkface

    from agecli.stages.evaluate import evaluate
    from agecli.stages.prepare import prepare

    root = require_utkface()
    counts = {}
    for seed in (0, 1):
        run = tmp_path / f"seed{seed}"
        prepare("utkface", root, run, detector="none", size=92, limit=600, seed=seed, workers=0)
        for split in ("train", "test"):
            result = evaluate("default", run, split, device="cpu")
            said = [w for w in result["warnings"] if "faces this model or its teachers learned from" in w]
            counts[seed, split] = (int(said[0].split()[0]) if said else 0, result["metrics"]["n"])
    reads = json.loads((run / "eval" / "default" / "manifest.json").read_text())["reads"]
    assert "agecli:weights/default.pt" in reads   # by its place in the package: another installation compares
    assert counts[0, "train"][0] == counts[0, "train"][1] > 300 and counts[0, "test"][0] == 0
    for split in ("train", "test"):
        seen, scored = counts[1, split]
        assert 0.55 * scored < seen < 0.85 * scored
    # taught by the default by name, a student of the seed-1 run is told its teacher saw its test faces
    from agecli.options import TrainOptions
    from agecli.stages.distill import distill

    student = distill(tmp_path / "seed1", teachers=["default"], student="mobilenet_v3_small", size=32,
                      options=TrainOptions(epochs=1, max_batches=1, batch_size=16, workers=0, threads=1, device="cpu"))
    assert any(w.startswith(f"teacher default learned from {counts[1, 'test'][0]} of the run's") for w in student["warnings"])


def test_a_wheel_carries_the_model_recipes_and_sample(tmp_path):
    """`pip wheel .` then, from the unpacked wheel and another folder: `agecli run utkface` finds
    its recipe, and `agecli predict` runs the default model on a bundled photo."""
    pytest.importorskip("facenet_pytorch", reason="MTCNN (facenet-pytorch) not installed")
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__",
                                                                ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "-w", str(tmp_path / "wheel"),
                           "--no-deps", "--no-build-isolation", "-q"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    wheel = next((tmp_path / "wheel").glob("agecli-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("agecli/weights/default.pt", "agecli/weights/MODEL_CARD.md", "agecli/recipes/bundled/utkface.yaml",
                   "agecli/sample/photos/group1.jpg", "agecli/sample/quickstart.yaml"):
        assert needed in names, needed
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the wheel first; entries already on PYTHONPATH stay behind it (they may hold the dependencies)
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *kept]), "OMP_NUM_THREADS": "1"}
    code = ("import agecli; from agecli.recipes.recipe import find_recipe; "
            "print(agecli.__file__, find_recipe('utkface'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(site / "agecli" / "__init__.py"),
                                   str(site / "agecli" / "recipes" / "bundled" / "utkface.yaml")]
    proc = subprocess.run([sys.executable, "-m", "agecli.cli", "predict", "-q",
                           str(site / "agecli" / "sample" / "photos" / "group1.jpg")],
                          capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "3 face(s)" in proc.stdout
