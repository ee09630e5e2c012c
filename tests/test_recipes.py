"""Recipes: every bundled recipe validates against the real library signatures; bad keys and
values are named precisely; a recipe runs, is copied into the run, and resumes by skipping
completed steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agecli.errors import AgecliError
from agecli.recipes import STAGE_KINDS, apply_override, load_recipe, parse_recipe, plan, run_recipe, Recipe
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
    assert "Valid keys for train (agecli.train.train)" in message
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
    recipe = _recipe("train:\n  - {name: a, arch: mobilenet_v3_small, init: '{run}/train/x/best.pt'}\n", tmp_path)
    steps = plan(recipe, tmp_path / "myrun")
    assert steps[0].kwargs["init"] == f"{tmp_path / 'myrun'}/train/x/best.pt"


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
    from agecli.checkpoint import read_checkpoint
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
