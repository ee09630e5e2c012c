"""Recipes: every bundled recipe validates against the real library signatures; bad keys and
values are named precisely; a recipe runs, is copied into the run, and resumes by skipping
completed steps."""

from __future__ import annotations

import dataclasses
import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agecli.errors import AgecliError
from agecli.recipes import STAGE_KINDS, Recipe, apply_override, load_recipe, needs, parse_recipe, plan, run_recipe
from agecli.stages.report import seed_groups, write_report
from conftest import build_store, synthetic_faces

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
REQUIRED = {"utkface", "adience", "lap2016", "fgnet", "greco2021", "zhao2021", "antipov2017"}


def _recipe(text: str, tmp_path: Path, name: str = "r.yaml") -> Recipe:
    path = tmp_path / name
    path.write_text(text)
    return load_recipe(path)


def _skip_if_stage_missing(exc: AgecliError) -> None:
    if "which this agecli does not have" in str(exc):
        pytest.skip(f"a stage module is not written yet: {exc}")


def test_all_required_recipes_exist():
    assert REQUIRED <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path, tmp_path):
    recipe = load_recipe(path)
    text = path.read_text()
    assert text.lstrip().startswith("#"), "each recipe opens with a comment naming its paper / protocol"
    try:
        result = run_recipe(recipe, tmp_path / "run", tmp_path, dry_run=True)
    except AgecliError as exc:
        _skip_if_stage_missing(exc)
        raise
    assert result["dry_run"] and result["steps"]
    assert all(step["action"] == "run" for step in result["steps"])
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"
    sections = [s["step"].split("/")[0] for s in result["steps"]]
    assert sections == sorted(sections, key=list(STAGE_KINDS).index), "steps run in pipeline order"


def test_unknown_key_names_stage_key_valid_keys_and_suggestion(tmp_path):
    recipe = _recipe("train:\n  - {name: teacher, arch: resnet18, epoch: 3}\n", tmp_path)
    with pytest.raises(AgecliError) as info:
        plan(recipe, tmp_path / "run")
    message = str(info.value)
    assert "[train/teacher]" in message
    assert "unknown key 'epoch'" in message
    assert "did you mean 'epochs'" in message
    assert "Valid keys for train (agecli.stages.train.train)" in message
    assert "batch_size" in message and "warmup_epochs" in message  # TrainOptions fields count as keys


def test_unknown_section_and_type_errors(tmp_path):
    with pytest.raises(AgecliError, match=r"unknown section 'trian' \(did you mean 'train'\?\)"):
        plan(_recipe("trian:\n  - {name: a, arch: resnet18}\n", tmp_path), tmp_path / "run")
    with pytest.raises(AgecliError, match=r"'epochs' must be an integer, not 'three'"):
        plan(_recipe("train:\n  - {name: a, arch: resnet18, epochs: three}\n", tmp_path), tmp_path / "run")
    with pytest.raises(AgecliError, match=r"missing required 'arch'"):
        plan(_recipe("train:\n  - {name: a, epochs: 1}\n", tmp_path), tmp_path / "run")
    with pytest.raises(AgecliError, match=r"needs a `name:`"):
        plan(_recipe("train:\n  - {arch: resnet18}\n", tmp_path), tmp_path / "run")
    with pytest.raises(AgecliError, match=r"'run' is set by `agecli run`"):
        plan(_recipe("train:\n  - {name: a, arch: resnet18, run: x}\n", tmp_path), tmp_path / "run")


def test_yaml_tags_that_import_code_are_refused(tmp_path):
    with pytest.raises(AgecliError, match="not valid YAML"):
        parse_recipe("train: !!python/object/apply:os.system ['echo hi']\n")


def test_overrides_by_name_index_and_for_every_entry():
    data = parse_recipe("train:\n  - {name: a, arch: resnet18}\n  - {name: b, arch: resnet34}\n"
                        "prepare: {dataset: utkface}\n")
    apply_override(data, "train.epochs=2")
    apply_override(data, "train.b.lr=0.01")
    apply_override(data, "train.0.size=48")
    apply_override(data, "prepare.limit=100")
    apply_override(data, "train.a.folds=[1, 2]")
    assert data["train"][0] == {"name": "a", "arch": "resnet18", "epochs": 2, "size": 48, "folds": [1, 2]}
    assert data["train"][1] == {"name": "b", "arch": "resnet34", "epochs": 2, "lr": 0.01}
    assert data["prepare"]["limit"] == 100
    with pytest.raises(AgecliError, match=r"no entry 'c'"):
        apply_override(data, "train.c.lr=1")
    with pytest.raises(AgecliError, match="not KEY=VALUE"):
        apply_override(data, "train.lr")


def test_run_and_cross_references_resolve(tmp_path):
    recipe = _recipe("train:\n  - {name: x, arch: mobilenet_v3_small}\n"
                     "  - {name: a, arch: mobilenet_v3_small, init: '{run}/train/x/best.pt'}\n", tmp_path)
    steps = plan(recipe, tmp_path / "myrun")
    assert steps[1].kwargs["init"] == f"{tmp_path / 'myrun'}/train/x/best.pt"


def test_a_recipe_asking_for_a_gpu_index_the_machine_lacks_is_refused_before_anything_runs(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    images, records = synthetic_faces(60, 32)
    run = build_store(tmp_path / "run", images, records, dataset="synthetic")
    recipe = _recipe("train:\n  - {name: a, arch: mobilenet_v3_small, device: cuda}\n"
                     "distill:\n  - {name: b, teachers: ['{run}/train/a/best.pt'], device: cuda:0, "
                     "teacher_device: cuda:1}\nreport: {}\n", tmp_path)
    with pytest.raises(AgecliError, match=r"^distill/b \(cuda:1\) ask for a GPU this machine lacks: torch sees "
                                          r"1 CUDA GPU\(s\) on this machine \(cuda:0\)"):
        run_recipe(recipe, run)
    assert not (run / "recipe.yaml").exists() and not (run / "train").exists()


def test_a_gpu_recipe_on_a_machine_without_one_is_refused_before_anything_runs(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    images, records = synthetic_faces(60, 32)
    run = build_store(tmp_path / "run", images, records, dataset="synthetic")
    recipe = _recipe("train:\n  - {name: a, arch: mobilenet_v3_small, device: cuda}\n"
                     "distill:\n  - {name: b, teachers: ['{run}/train/a/best.pt'], device: cuda:0}\nreport: {}\n",
                     tmp_path)
    with pytest.raises(AgecliError, match=r"train/a, distill/b ask for a CUDA GPU.*"
                                          r"--set train.device=cpu --set distill.device=cpu"):
        run_recipe(recipe, run)
    assert not (run / "recipe.yaml").exists() and not (run / "train").exists()
    assert run_recipe(recipe, run, dry_run=True)["dry_run"]          # validating needs no GPU
    assert run_recipe(recipe, run, only=["report"])["steps"][-1]["action"] == "run"   # GPU steps not selected
    overridden = load_recipe(tmp_path / "r.yaml", ["train.device=cpu", "distill.device=cpu"])
    assert {step.kwargs["device"] for step in plan(overridden, run) if step.section != "report"} == {"cpu"}


@pytest.mark.slow
def test_recipe_runs_copies_itself_skips_completed_and_refuses_changed(tmp_path):
    """A real (tiny) training run through a recipe: it learns, is recorded, and resumes."""
    images, records = synthetic_faces(240, 48)
    run = build_store(tmp_path / "run", images, records, dataset="synthetic")
    text = ("# tiny\ntrain:\n  - name: tiny\n    arch: mobilenet_v3_small\n    size: 32\n    encoding: regression\n"
            "    epochs: 2\n    batch_size: 32\n    lr: 0.003\n    workers: 0\n    threads: 2\n")
    recipe = _recipe(text, tmp_path)
    result = run_recipe(recipe, run)
    step = result["steps"][0]
    assert step["action"] == "run" and step["seconds"] > 0
    manifest = json.loads((run / "train" / "tiny" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["args"]["options"]["epochs"] == 2
    assert (run / "train" / "tiny" / "best.pt").exists()
    assert (run / "recipe.yaml").read_text().endswith(text)

    # the recipe's options reached the library: the checkpoint and history say so, and it learned
    from agecli.modeling.checkpoint import read_checkpoint
    import pandas as pd

    spec = read_checkpoint(run / "train" / "tiny" / "best.pt")["spec"]
    assert spec["input_size"] == 32 and spec["encoding"]["name"] == "regression"
    history = pd.read_csv(run / "train" / "tiny" / "history.csv")
    assert len(history) == 2
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]

    again = run_recipe(load_recipe(tmp_path / "r.yaml"), run)
    assert again["steps"][0]["action"] == "skip (complete)"
    assert "seconds" not in again["steps"][0]
    assert not (run / "train" / "tiny2").exists()

    changed = load_recipe(tmp_path / "r.yaml", ["train.tiny.epochs=3"])
    with pytest.raises(AgecliError, match=r"train/tiny already completed with different options"):
        run_recipe(changed, run)


@pytest.mark.slow
def test_cross_validation_on_faces_prepared_again_runs_again_with_its_fold_models_set_aside(tmp_path):
    images, records = synthetic_faces(160, 32, folds=2)
    run = build_store(tmp_path / "run", images, records, dataset="synthetic")
    recipe = _recipe("cross_validate:\n  - name: cv\n    arch: mobilenet_v3_small\n    size: 32\n    encoding: "
                     "regression\n    epochs: 1\n    batch_size: 32\n    workers: 0\n    threads: 1\n", tmp_path)
    run_recipe(recipe, run)
    assert sorted(p.name for p in (run / "train").iterdir()) == ["cv-cv", "cv-fold0", "cv-fold1"]
    records["age"] = records["age"] + 1          # the labels corrected, the faces prepared again
    build_store(run, images, records, dataset="synthetic")
    assert [s["action"] for s in run_recipe(recipe, run, dry_run=True)["steps"]] == [
        "rerun (the run's faces changed since)"]
    run_recipe(recipe, run)
    assert sorted(p.name for p in (run / "train").iterdir()) == ["cv-cv", "cv-fold0", "cv-fold1"]
    assert sorted(p.name for p in (run / "superseded" / "train").iterdir()) == ["cv-cv", "cv-fold0", "cv-fold1"]
    assert [s["action"] for s in run_recipe(recipe, run, dry_run=True)["steps"]] == ["skip (complete)"]


@pytest.mark.slow
def test_leftover_folders_live_writers_and_gone_inputs(tmp_path):
    """An empty step folder left by a killed start is reclaimed (not NAME2); a folder another
    process is writing is never moved; a finished step whose input is gone, with nothing run
    before it to write it again, is refused before anything moves."""
    import platform

    images, records = synthetic_faces(120, 32)
    run = build_store(tmp_path / "run", images, records, dataset="synthetic")
    recipe = _recipe("train:\n  - {name: a, arch: mobilenet_v3_small, size: 32, encoding: regression, epochs: 1, "
                     "batch_size: 32, workers: 0, threads: 1, max_batches: 2}\n"
                     "eval:\n  - {name: ea, model_path: '{run}/train/a/best.pt'}\n", tmp_path)
    (run / "train" / "a").mkdir(parents=True)
    (run / "train" / "a" / ".lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": platform.node()}))
    run_recipe(recipe, run)
    assert sorted(p.name for p in (run / "train").iterdir()) == ["a"]

    shutil.rmtree(run / "train" / "a")
    with pytest.raises(AgecliError, match=r"eval/ea \(train/a/best.pt gone, and no step run before it writes it: "
                                          r"run that step too"):
        run_recipe(recipe, run, only=["eval/ea"], dry_run=True)
    with pytest.raises(AgecliError, match="no step run before it writes it"):
        run_recipe(recipe, run, only=["eval/ea"])
    assert json.loads((run / "eval" / "ea" / "manifest.json").read_text())["status"] == "complete"
    assert not (run / "superseded").exists()

    # train/a started by another, live process (this test's parent): left to it
    (run / "train" / "a").mkdir()
    (run / "train" / "a" / "manifest.json").write_text(json.dumps({"stage": "train", "format_version": 1,
                                                                  "status": "running"}))
    (run / "train" / "a" / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": platform.node(),
                                                          "command": "agecli train"}))
    with pytest.raises(AgecliError, match="is being written by another agecli"):
        run_recipe(recipe, run, only=["train/a"])
    assert (run / "train" / "a" / ".lock").exists() and not (run / "train" / "a-unfinished").exists()


def test_dry_run_catches_what_would_fail_only_when_its_step_runs(tmp_path):
    run = tmp_path / "run"
    body = ("prepare: {{dataset: utkface, detector: {detector}}}\ntrain:\n  - {{name: teacher, arch: mobilenet}}\n"
            "distill:\n  - {{name: s, teachers: ['{teacher}'], student: mobilenet}}\n")
    good = dict(detector="mtcnn", teacher="{run}/train/teacher/best.pt")

    def dry(**change):
        return run_recipe(_recipe(body.format(**{**good, **change}), tmp_path), run, tmp_path, dry_run=True)

    assert [s["action"] for s in dry()["steps"]] == ["run", "run", "run"]
    with pytest.raises(AgecliError, match=r"\[prepare\] detector: 'mtcnnn' is not one of mtcnn, none \(did you mean 'mtcnn'"):
        dry(detector="mtcnnn")
    with pytest.raises(AgecliError, match=r"\[distill/s\] teachers: '\{rnu\}/train/teacher/best.pt' has \{rnu\} "
                                          r"\(did you mean 'run'\?\); a recipe fills in only \{run\}, \{root\}"):
        dry(teacher="{rnu}/train/teacher/best.pt")
    with pytest.raises(AgecliError, match=r"\[distill/s\] teachers: .*train/teachr/best.pt is written by no step "
                                          r"before it and does not exist yet \(did you mean 'train/teacher'\?\)"):
        dry(teacher="{run}/train/teachr/best.pt")
    # a teacher trained in the run before (outside this recipe) is fine
    (run / "train" / "teachr").mkdir(parents=True)
    (run / "train" / "teachr" / "best.pt").write_bytes(b"x")
    assert dry(teacher="{run}/train/teachr/best.pt")["steps"][-1]["action"] == "run"


def test_cli_dry_run_json_and_error_exit_code(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("# ok\ntrain:\n  - {name: t, arch: mobilenet, epochs: 1}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  - {name: t, arch: mobilenet, lr_max: 1}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "agecli.cli", "run"]
    out = subprocess.run([*cmd, str(good), "--run", str(tmp_path / "r"), "--dry-run", "--json"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["steps"][0]["step"] == "train/t" and payload["steps"][0]["action"] == "run"
    err = subprocess.run([*cmd, str(bad), "--run", str(tmp_path / "r"), "--dry-run"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert err.returncode == 2
    assert "unknown key 'lr_max'" in err.stderr and "Traceback" not in err.stderr


# --------------------------------------------------------------------------- --step and --jobs
TWO_TRAIN_STEPS = """# two independent tiny models
train:
  - &tiny {name: a, arch: mobilenet_v3_small, size: 32, encoding: regression, epochs: 1, batch_size: 32,
           max_batches: 2, workers: 0, threads: 1, augment: false, precise_bn_batches: 1, val_batch_size: 128}
  - {<<: *tiny, name: b, seed: 1}
report: {}
"""


def actions(result: dict) -> dict[str, str]:
    return {row["step"]: row["action"] for row in result["steps"]}


def test_only_selects_steps_and_unknown_labels_are_named(tmp_path):
    recipe = _recipe(TWO_TRAIN_STEPS, tmp_path)
    run = tmp_path / "run"
    picked = run_recipe(recipe, run, dry_run=True, only=["train/b"])
    assert actions(picked) == {"train/a": "not selected", "train/b": "run", "report": "not selected"}
    section = run_recipe(recipe, run, dry_run=True, only=["train"])
    assert actions(section) == {"train/a": "run", "train/b": "run", "report": "not selected"}
    both = run_recipe(recipe, run, dry_run=True, only=["report", "train/a"])
    assert actions(both) == {"train/a": "run", "train/b": "not selected", "report": "run"}

    with pytest.raises(AgecliError) as info:
        run_recipe(recipe, run, dry_run=True, only=["train/c", "train/a"])
    message = str(info.value)
    assert "train/c" in message and "no such step" in message
    assert "Steps: train/a, train/b, report" in message and "section: train, report" in message
    assert not run.exists()

    # not selected means not run: only the report is written (train has nothing to do with it)
    build_store(run, *synthetic_faces(60, 32))
    result = run_recipe(recipe, run, only=["report"])
    assert actions(result)["train/a"] == "not selected" and "seconds" not in result["steps"][0]
    assert (run / "report.md").exists() and not (run / "train").exists()
    assert set(json.loads((run / "recipe-state.json").read_text())["steps"]) == {"report"}


def test_a_step_recorded_by_another_process_meanwhile_is_kept(tmp_path, monkeypatch):
    """Two `agecli run --step` calls on one run: the one that ends last must not drop the
    other's record (each re-reads the state before writing its own step)."""
    from agecli.recipes import runner

    recipe = _recipe(TWO_TRAIN_STEPS, tmp_path)
    run = tmp_path / "run"
    build_store(run, *synthetic_faces(60, 32))
    (run / "recipe-state.json").write_text(json.dumps({"steps": {}}))
    run_here = runner._run_here

    def other_process_records_meanwhile(step, row, run_dir, root, progress, quiet):
        run_here(step, row, run_dir, root, progress, quiet)
        (run_dir / "recipe-state.json").write_text(
            json.dumps({"steps": {"train/b": {"fingerprint": "from-elsewhere", "seconds": 1.0}}}))

    monkeypatch.setattr(runner, "_run_here", other_process_records_meanwhile)
    run_recipe(recipe, run, only=["report"])
    steps = json.loads((run / "recipe-state.json").read_text())["steps"]
    assert set(steps) == {"report", "train/b"} and steps["train/b"]["fingerprint"] == "from-elsewhere"


def test_cli_step_and_jobs_options(tmp_path):
    from typer.testing import CliRunner

    from agecli.cli.app import app

    path = tmp_path / "r.yaml"
    path.write_text(TWO_TRAIN_STEPS)
    args = ["run", str(path), "--run", str(tmp_path / "run"), "--dry-run", "--json"]
    out = CliRunner().invoke(app, [*args, "--step", "train/a", "--step", "report", "--jobs", "2"])
    assert out.exit_code == 0, out.output
    rows = {r["step"]: r["action"] for r in json.loads(out.stdout)["steps"]}
    assert rows == {"train/a": "run", "train/b": "not selected", "report": "run"}
    bad = CliRunner().invoke(app, [*args, "--jobs", "0"])
    assert bad.exit_code != 0


@pytest.mark.slow
def test_jobs_runs_a_section_in_child_processes_records_and_skips(tmp_path):
    """Two tiny train steps at once (each a `python -m agecli` child), then the report in-process."""
    run = build_store(tmp_path / "run", *synthetic_faces(160, 32), dataset="synthetic")
    recipe = _recipe(TWO_TRAIN_STEPS, tmp_path)
    # an interrupted step with nothing to resume from: its child moves it aside and starts again
    (run / "train" / "a").mkdir(parents=True)
    (run / "train" / "a" / "manifest.json").write_text('{"status": "running"}')
    result = run_recipe(recipe, run, jobs=2)
    rows = {r["step"]: r for r in result["steps"]}
    assert rows["train/a"]["action"] == "resume" and (run / "train" / "a-unfinished").is_dir()
    for name in ("a", "b"):
        manifest = json.loads((run / "train" / name / "manifest.json").read_text())
        assert manifest["status"] == "complete"
        assert manifest["args"]["options"]["max_batches"] == 2
        assert (run / "train" / name / "best.pt").exists()
        log_path = run / "logs" / f"train__{name}.log"
        assert log_path.exists()
        assert rows[f"train/{name}"]["results"] == {"log": str(log_path)}
        assert rows[f"train/{name}"]["seconds"] > 0
    assert (run / "report.md").exists()
    state = json.loads((run / "recipe-state.json").read_text())["steps"]
    assert set(state) == {"train/a", "train/b", "report"}
    assert all(entry["fingerprint"] and entry["seconds"] > 0 for entry in state.values())
    # a and b differ only in their seed: the report gives their spread
    groups = seed_groups(run)
    assert [(g["models"], g["seeds"]) for g in groups] == [("a / b", "0, 1")]
    tests = [json.loads((run / "train" / n / "metrics.json").read_text())["test"]["mae"] for n in ("a", "b")]
    assert groups[0]["test_mae_range"] == pytest.approx(abs(tests[0] - tests[1]))
    assert groups[0]["test_mae_mean"] == pytest.approx(sum(tests) / 2)
    assert "## 5. Seeds" in (run / "report.md").read_text()
    # children read the parent's recipe frozen under RUN/logs and leave RUN/recipe.yaml as it wrote it
    frozen = list((run / "logs").glob("recipe-*.yaml"))
    assert len(frozen) == 1 and frozen[0].read_text() == (run / "recipe.yaml").read_text()
    assert frozen[0].name in json.loads((run / "train" / "a" / "manifest.json").read_text())["command"]
    assert (run / "recipe.yaml").read_text().count("# copied by `agecli run`") == 1

    logs_written = {p.name: p.stat().st_mtime_ns for p in (run / "logs").iterdir()}
    again = run_recipe(load_recipe(tmp_path / "r.yaml"), run, jobs=2)
    # the report has no stage manifest, so it always runs again (as without --jobs)
    assert [r["action"] for r in again["steps"]] == ["skip (complete)", "skip (complete)", "run"]
    assert not any("seconds" in r for r in again["steps"][:2])
    assert {p.name: p.stat().st_mtime_ns for p in (run / "logs").iterdir()} == logs_written, "no child started"


@pytest.mark.slow
def test_a_failing_child_is_named_with_its_log_and_its_sibling_still_completes(tmp_path):
    run = build_store(tmp_path / "run", *synthetic_faces(160, 32), dataset="synthetic")
    # a missing --init passes validation and fails only when the stage runs
    text = TWO_TRAIN_STEPS.replace("seed: 1}", "seed: 1, init: '{run}/missing.pt'}")
    with pytest.raises(AgecliError) as info:
        run_recipe(_recipe(text, tmp_path), run, jobs=2)
    message = str(info.value)
    log_path = run / "logs" / "train__b.log"
    assert "train/b exited with code 2" in message
    assert f"log: {log_path}" in message
    assert "missing.pt does not exist" in message  # the tail of the child's log
    assert "train/a" not in message.split("\n", 1)[0]
    assert json.loads((run / "train" / "a" / "manifest.json").read_text())["status"] == "complete"
    state = json.loads((run / "recipe-state.json").read_text())["steps"]
    assert set(state) == {"train/a"}, "the sibling is recorded, the failed step is not"
    assert not (run / "report.md").exists(), "a later section does not start after a failure"


def test_a_step_that_reads_a_later_step_of_its_section_is_refused(tmp_path, monkeypatch):
    run = tmp_path / "run"
    text = TWO_TRAIN_STEPS.replace("max_batches: 2,", "max_batches: 2, init: '{run}/train/b/best.pt',", 1)
    with pytest.raises(AgecliError, match=r"\[train/a\] reads the output of train/b.*move train/a below train/b"):
        plan(_recipe(text, tmp_path), run)
    # the same reference, listed in order, plans; a name that only starts the same does not count
    ordered = TWO_TRAIN_STEPS.replace("seed: 1}", "seed: 1, init: '{run}/train/a/best.pt'}")
    steps = plan(_recipe(ordered, tmp_path), run)
    assert [s.label for s in needs(steps[1], steps, run)] == ["train/a"]
    # the run's path written out, absolute or relative to here, is the same folder (--jobs waits for it)
    monkeypatch.chdir(tmp_path)
    for written in (f"{run}/train/a/best.pt", "run/train/a/best.pt", "./run/../run/train/a"):
        literal = TWO_TRAIN_STEPS.replace("seed: 1}", f"seed: 1, init: '{written}'}}")
        steps = plan(_recipe(literal, tmp_path), run)
        assert [s.label for s in needs(steps[1], steps, run)] == ["train/a"], written
    backwards = TWO_TRAIN_STEPS.replace("max_batches: 2,", "max_batches: 2, init: 'run/train/b/best.pt',", 1)
    with pytest.raises(AgecliError, match=r"reads the output of train/b"):
        plan(_recipe(backwards, tmp_path), run)
    prefix = TWO_TRAIN_STEPS.replace("seed: 1}", "seed: 1, init: '{run}/train/ab/best.pt'}")
    (run / "train" / "ab").mkdir(parents=True)   # trained before, outside the recipe
    (run / "train" / "ab" / "best.pt").write_bytes(b"")
    steps = plan(_recipe(prefix, tmp_path), run)
    assert needs(steps[1], steps, run) == []


@pytest.mark.slow
def test_jobs_children_run_their_parents_recipe_whatever_rewrites_the_runs_copy(tmp_path, monkeypatch):
    """Another `agecli run` on the same run (another recipe) rewrites RUN/recipe.yaml; the
    children of a --jobs run started after that still run the steps their parent planned."""
    from agecli.recipes import children

    run = build_store(tmp_path / "run", *synthetic_faces(160, 32), dataset="synthetic")
    other = "train:\n  - {name: z, arch: mobilenet_v3_small, size: 32, epochs: 1}\n"
    start = children._start

    def rewrite_then_start(step, row, run_dir, *rest):
        (run_dir / "recipe.yaml").write_text(other)  # what a concurrent `agecli run other.yaml` does
        return start(step, row, run_dir, *rest)

    monkeypatch.setattr(children, "_start", rewrite_then_start)
    run_recipe(_recipe(TWO_TRAIN_STEPS, tmp_path), run, jobs=2, only=["train"])
    for name in ("a", "b"):
        assert json.loads((run / "train" / name / "manifest.json").read_text())["status"] == "complete"
    assert not (run / "train" / "z").exists()


def test_jobs_waits_for_a_step_whose_model_the_next_one_starts_from(tmp_path):
    """Under --jobs, b (initialised from a's best.pt) starts only once a has finished;
    started together, b would fail on a missing file."""
    run = build_store(tmp_path / "run", *synthetic_faces(160, 32), dataset="synthetic")
    text = TWO_TRAIN_STEPS.replace("seed: 1}", "seed: 1, init: '{run}/train/a/best.pt'}")
    run_recipe(_recipe(text, tmp_path), run, jobs=2)
    a = json.loads((run / "train" / "a" / "manifest.json").read_text())
    b = json.loads((run / "train" / "b" / "manifest.json").read_text())
    assert a["status"] == b["status"] == "complete"
    assert b["args"]["init"] == str(run / "train" / "a" / "best.pt")


def test_seed_groups_ignore_runtime_options_and_unfinished_models(tmp_path):
    def model(name, status="complete", seed=0, epochs=4, threads=1, mae=6.0):
        folder = tmp_path / "train" / name
        folder.mkdir(parents=True)
        args = {"arch": "dlib_resnet6", "name": name, "options": {"epochs": epochs, "seed": seed, "threads": threads}}
        (folder / "manifest.json").write_text(json.dumps({"status": status, "args": args}))
        (folder / "metrics.json").write_text(json.dumps({"val": {"mae": mae - 0.5}, "test": {"mae": mae}}))

    model("s0", seed=0, mae=6.0)
    model("s1", seed=1, threads=2, mae=6.3)      # other threads: still a seed of s0
    model("s2", seed=2, status="running", mae=1.0)  # unfinished: left out
    model("e8", seed=1, epochs=8, mae=5.0)         # another schedule: its own (single) group
    groups = seed_groups(tmp_path)
    assert [(g["models"], g["seeds"]) for g in groups] == [("s0 / s1", "0, 1")]
    assert groups[0]["test_mae_mean"] == pytest.approx(6.15) and groups[0]["test_mae_range"] == pytest.approx(0.3)
    assert groups[0]["val_mae_mean"] == pytest.approx(5.65)


@pytest.mark.slow
def test_a_bench_that_predates_a_newly_trained_model_is_stale_and_runs_again(tmp_path):
    images, records = synthetic_faces(160, 32)
    run = build_store(tmp_path / "run", images, records, dataset="synthetic")
    entry = ("  - name: {name}\n    arch: mobilenet_v3_small\n    size: 32\n    encoding: regression\n"
             "    epochs: 1\n    batch_size: 32\n    workers: 0\n    threads: 1\n")
    bench = ("bench:\n  include_reference: false\n  backends: [eager]\n  batch_sizes: [1]\n"
             "  warmup: 1\n  repeats: 2\n  report: false\n")
    run_recipe(_recipe("train:\n" + entry.format(name="a") + bench, tmp_path), run)
    first = json.loads((run / "bench" / "manifest.json").read_text())
    assert first["status"] == "complete" and set(first["inputs"]) == {"a"}

    # a model still training is not benched: its best.pt exists, its manifest says running
    unfinished = run / "train" / "c"
    unfinished.mkdir()
    (unfinished / "best.pt").write_bytes((run / "train" / "a" / "best.pt").read_bytes())
    (unfinished / "manifest.json").write_text(json.dumps({"status": "running"}))
    again = run_recipe(_recipe("train:\n" + entry.format(name="a") + bench, tmp_path), run, dry_run=True)
    assert [s["action"] for s in again["steps"]] == ["skip (complete)", "skip (complete)"]

    grown = _recipe("train:\n" + entry.format(name="a") + entry.format(name="b") + bench, tmp_path)
    planned = run_recipe(grown, run, dry_run=True)
    assert [s["action"] for s in planned["steps"]] == ["skip (complete)", "run", "rerun (train/b runs first)"]
    run_recipe(grown, run, only=["train/b"])
    planned = run_recipe(grown, run, dry_run=True)
    assert planned["steps"][-1]["action"] == "rerun (models changed since)"
    run_recipe(grown, run)
    second = json.loads((run / "bench" / "manifest.json").read_text())
    assert second["status"] == "complete" and set(second["inputs"]) == {"a", "b"}
    assert run_recipe(grown, run, dry_run=True)["steps"][-1]["action"] == "skip (complete)"
    # a model changed behind the bench's back (another file copied over it): the report says so
    assert "**Out of date:**" not in write_report(run).read_text()
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (run / "train" / "a" / "best.pt").write_bytes((run / "train" / "b" / "best.pt").read_bytes())
    assert "**Out of date:** `a` changed since this bench measured them" in write_report(run).read_text()
    assert "**Out of date:**" not in write_report(copy).read_text()   # the copy's models are its own


@pytest.mark.slow
def test_a_student_and_an_eval_of_a_retrained_teacher_run_again_and_keep_their_old_results(tmp_path):
    images, records = synthetic_faces(160, 32)
    run = build_store(tmp_path / "run", images, records, dataset="synthetic")
    loop = "    epochs: 1\n    batch_size: 32\n    workers: 0\n    threads: 1\n"
    text = ("train:\n  - name: a\n    arch: mobilenet_v3_small\n    size: 32\n    encoding: regression\n" + loop +
            "  - name: b\n    arch: mobilenet_v3_small\n    size: 32\n    encoding: regression\n    seed: 1\n" + loop +
            "distill:\n  - name: s\n    teachers: ['{run}/train/a/best.pt']\n    student: mobilenet_v3_small\n"
            "    size: 32\n    encoding: regression\n" + loop +
            "eval:\n  - name: e\n    model_path: '{run}/distill/s/best.pt'\n"
            "  - name: ea\n    model_path: '{run}/train/a/best.pt'\n")
    recipe = _recipe(text, tmp_path)
    run_recipe(recipe, run)
    actions = lambda: [s["action"] for s in run_recipe(recipe, run, dry_run=True)["steps"]]  # noqa: E731
    assert actions() == ["skip (complete)"] * 5
    reads = json.loads((run / "distill" / "s" / "manifest.json").read_text())["reads"]
    teacher = "train/a/best.pt"
    assert set(reads) == {".", teacher}   # inside the run: relative to it
    # a run folder moved elsewhere is still current
    moved = tmp_path / "moved"
    run.rename(moved)
    assert [s["action"] for s in run_recipe(recipe, moved, dry_run=True)["steps"]] == ["skip (complete)"] * 5
    moved.rename(run)

    # the teacher's file changes under the finished student (another model copied over it)
    (run / "train" / "a" / "best.pt").write_bytes((run / "train" / "b" / "best.pt").read_bytes())
    assert actions() == ["skip (complete)", "skip (complete)", "rerun (train/a/best.pt changed since)",
                         "rerun (distill/s runs first)", "rerun (train/a/best.pt changed since)"]
    report = write_report(run).read_text()
    stale = [part.split("\n")[0] for part in report.split("### ")[1:] if "**Out of date:** `train/a/best.pt`" in part]
    assert stale == ["distill/s", "eval/ea"]   # eval/e read the student, which has not changed yet

    # retrained from scratch: everything that read it runs again, the old results are kept aside
    old_student = (run / "distill" / "s" / "best.pt").read_bytes()
    shutil.rmtree(run / "train" / "a")
    assert actions() == ["run", "skip (complete)", "rerun (train/a/best.pt gone)", "rerun (distill/s runs first)",
                         "rerun (train/a/best.pt gone)"]
    run_recipe(recipe, run)
    assert (run / "superseded" / "distill" / "s" / "best.pt").read_bytes() == old_student
    assert (run / "superseded" / "eval" / "e" / "manifest.json").exists()
    assert not (run / "distill" / "s2").exists() and not (run / "distill" / "s-unfinished").exists()
    reads = json.loads((run / "distill" / "s" / "manifest.json").read_text())["reads"]
    assert reads[teacher] == json.loads((run / "train" / "a" / "manifest.json").read_text())["files"]["best.pt"]["sha256"]
    assert actions() == ["skip (complete)"] * 5

    # eval/ea rewritten by hand with another model: no longer the recipe's step, and said so
    from agecli.stages.evaluate import evaluate

    evaluate(run / "distill" / "s" / "best.pt", run, name="ea")
    with pytest.raises(AgecliError, match=r"eval/ea \(its folder was rewritten since this recipe ran it"):
        run_recipe(recipe, run, dry_run=True)


# --------------------------------------------------------------------------- signatures
@dataclasses.dataclass
class _Knobs:
    depth: int = 2
    rate: float = 0.1


def _stage_with_options(run=None, *, name: str, knobs: _Knobs | None = None, other: NotDefinedAnywhere = None,
                        progress=None):
    return knobs


def test_an_options_dataclass_is_found_from_its_annotation_alone():
    """No table of option classes: the annotation names it, even when another parameter's
    annotation cannot be resolved (which makes typing.get_type_hints fail for the function)."""
    from agecli.recipes.signatures import bind, parameters

    params = parameters(_stage_with_options)
    assert set(params) == {"name", "depth", "rate", "other"}
    assert params["depth"].annotation is int and params["depth"].owner == "knobs" and not params["depth"].required
    assert params["name"].required
    remaining = {"name": "x", "depth": 3}
    kwargs = bind(_stage_with_options, remaining, run="RUN", root=None, progress=None)
    assert kwargs == {"run": "RUN", "name": "x", "knobs": _Knobs(depth=3), "progress": None} and not remaining
    assert bind(_stage_with_options, {"name": "y"}, run=None, root=None, progress=None) == {"name": "y", "progress": None}


def test_the_plan_shows_the_stage_modules_public_function():
    """A stage split into a package (its function defined in a submodule) keeps its public name."""
    assert all(kind.target() == f"{kind.module}.{kind.function().__name__}" for kind in STAGE_KINDS.values())
