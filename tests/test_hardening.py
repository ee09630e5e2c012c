"""Hostile and careless input, made on disk here: names that climb out of the run, folders
agecli did not write, decompression bombs behind other extensions, a named pipe, damaged
JPEG and NaN TIFF files, a checkpoint claiming 30000 px inputs, a YAML alias bomb, two
writers in one run, signals, and out-of-range options. Each test fails without its guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from agecli.errors import AgecliError
from agecli.options import DistillOptions, PrepareOptions, TrainOptions
from agecli.rundir import Stage, StageLock, check_name, read_json
from conftest import UTKFACE_DIR, build_store, require_utkface, synthetic_faces, train_tiny_checkpoint

BAD_NAMES = ["../../../victim", "/tmp/abs", "a/b", "..", ".", "", " ", ".hidden", "a\\b", "x\x00y", "tab\tname"]


def agecli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """The real command in a child process (exit codes and signals are part of what is tested)."""
    env = {**os.environ, "COLUMNS": "1000"}  # rich would wrap messages at 80 columns
    return subprocess.run([sys.executable, "-m", "agecli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, **kwargs)


@pytest.fixture
def small_run(tmp_path) -> Path:
    images, records = synthetic_faces(120, 48)
    return build_store(tmp_path / "runs" / "small", images, records, dataset="synthetic")


# --------------------------------------------------------------------------- 1. names
@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_that_is_not_a_plain_folder_name_is_refused(name):
    with pytest.raises(AgecliError, match="not a plain folder name"):
        check_name(name)


def test_plain_names_pass():
    for name in ("resnet50", "student-v2", "a.b_c", "fold 3"):
        assert check_name(name) == name


def test_traversal_names_write_nothing_outside_the_run(small_run, tmp_path):
    from agecli.stages.evaluate import evaluate
    from agecli.stages.train import train

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "metrics.json").write_text("the user's")
    model = train_tiny_checkpoint(small_run, tmp_path / "m.pt", size=32, epochs=1, gender=False)
    for name in ("../../../victim", str(victim), "a/b"):
        with pytest.raises(AgecliError, match="not a plain folder name"):
            evaluate(model, small_run, name=name, device="cpu")
        with pytest.raises(AgecliError, match="not a plain folder name"):
            train(small_run, arch="mobilenet", name=name, size=32, options=TrainOptions(epochs=1, device="cpu"))
    assert (victim / "metrics.json").read_text() == "the user's"
    assert sorted(p.name for p in victim.iterdir()) == ["metrics.json"]
    assert not (small_run / "eval").exists() and not (small_run / "train").exists()
    result = agecli("eval", "--model", str(model), "--run", str(small_run), "--name", "../../../victim")
    assert result.returncode == 2 and "not a plain folder name" in result.stderr
    assert sorted(p.name for p in victim.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize("name", ["../../../escape_train", "a/b", "/abs/x"])
def test_recipe_step_names_are_checked_by_the_dry_run(tmp_path, name):
    from agecli.recipes import load_recipe, run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"train:\n  - {{name: {json.dumps(name)}, arch: mobilenet, epochs: 1}}\n")
    with pytest.raises(AgecliError, match="not a plain folder name"):
        run_recipe(load_recipe(recipe), tmp_path / "run", dry_run=True)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 2. user files
def test_a_folder_agecli_did_not_write_is_never_written_into(small_run):
    mine = small_run / "eval" / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(AgecliError, match="not written by agecli"):
        with Stage(small_run, "eval", "mine"):
            raise AssertionError("the block must not run")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"


def test_run_pointing_at_a_file_is_a_clear_error(tmp_path, small_run):
    from agecli.stages.train import train

    file = tmp_path / "notes.txt"
    file.write_text("x")
    result = agecli("prepare", "folder", "--root", str(tmp_path), "--run", str(file), "--detector", "none")
    assert result.returncode == 2 and "is a file, not a run folder" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and file.read_text() == "x"
    with pytest.raises(AgecliError, match="is a file, not a run folder"):
        train(file, arch="mobilenet")


def test_outputs_are_readable_like_any_other_file(tmp_path):
    from agecli.rundir import write_text

    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "out.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_re_preparing_a_run_that_holds_models_with_other_settings_is_refused(tmp_path):
    from agecli.stages.prepare import prepare

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        cv2.imwrite(str(photos / f"{i}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    run = tmp_path / "run"
    prepare("folder", photos, run, detector="none", size=32)
    faces = (run / "prepare" / "faces.npy").read_bytes()
    with Stage(run, "train", "model") as stage:
        stage.path("best.pt").write_bytes(b"weights")
        stage.complete()
    with pytest.raises(AgecliError, match="holds models trained on those faces"):
        prepare("folder", photos, run, detector="none", size=48)
    assert (run / "prepare" / "faces.npy").read_bytes() == faces
    assert prepare("folder", photos, run, detector="none", size=32)["reused"] is True


# --------------------------------------------------------------------------- 3. resource exhaustion
def _hostile_folder(root: Path) -> Path:
    """Two good photos and the hostile files, under image names."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    face = cv2.GaussianBlur(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8), (9, 9), 3)
    cv2.imwrite(str(root / "good.png"), face)
    cv2.imwrite(str(root / "good2.jpg"), face)
    # Radiance HDR claiming 11000 x 11000 (1.45 GB of float pixels), called .jpg
    (root / "bomb.jpg").write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 11000 +X 11000\n" + bytes(4096))
    # the same behind a TIFF header: 30000 x 30000 declared in the first directory
    ok, tiff = cv2.imencode(".tiff", face)
    data = bytearray(tiff.tobytes())
    tiff_bomb = _patch_tiff_size(data, 30000, 30000)
    (root / "bomb.tif").write_bytes(tiff_bomb)
    os.mkfifo(root / "pipe.jpg")
    jpeg = cv2.imencode(".jpg", cv2.resize(face, (512, 512)), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    third = len(jpeg) // 3
    (root / "zeroed.jpg").write_bytes(jpeg[:third] + bytes(third) + jpeg[2 * third:])
    nan = np.full((64, 64, 3), 0.5, np.float32)
    nan[10:20, 10:20] = np.nan
    (root / "nan.tif").write_bytes(cv2.imencode(".tiff", nan)[1].tobytes())
    return root


def _patch_tiff_size(data: bytearray, width: int, height: int) -> bytes:
    import struct

    order = "<" if data[:2] == b"II" else ">"
    offset = struct.unpack(order + "I", data[4:8])[0]
    count = struct.unpack(order + "H", data[offset:offset + 2])[0]
    for k in range(count):
        at = offset + 2 + 12 * k
        tag, kind = struct.unpack(order + "HH", data[at:at + 4])
        if tag in (256, 257):
            value = width if tag == 256 else height
            data[at + 2:at + 8] = struct.pack(order + "HI", 4, 1)  # LONG, one value
            data[at + 8:at + 12] = struct.pack(order + "I", value)
    return bytes(data)


def test_hostile_files_become_rejects_and_prepare_finishes(tmp_path):
    root = _hostile_folder(tmp_path / "photos")
    started = time.perf_counter()
    result = agecli("prepare", "folder", "--root", str(root), "--run", str(tmp_path / "run"), "--detector", "none",
                    "--size", "32", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - started < 100
    rejects = pd.read_csv(tmp_path / "run" / "prepare" / "rejects.csv").set_index("path")["reason"].to_dict()
    assert rejects == {"bomb.jpg": "too_large", "bomb.tif": "too_large", "pipe.jpg": "not_a_file",
                       "zeroed.jpg": "corrupt", "nan.tif": "corrupt"}
    records = pd.read_csv(tmp_path / "run" / "prepare" / "records.csv")
    assert sorted(records["path"]) == ["good.png", "good2.jpg"]


def test_image_sizes_come_from_the_header_of_the_format_opencv_decodes(tmp_path):
    from agecli.data.faces import ImageError, check_size, read_image, sniff_format

    hdr = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 30 +X 40\n" + bytes(30 * 40 * 4)
    assert sniff_format(hdr) == "HDR" and check_size(hdr, "HDR") == (40, 30)
    assert read_image("small.hdr", hdr).shape == (30, 40, 3)
    pfm = b"PF\n20000 20000\n-1.0\n" + bytes(64)
    with pytest.raises(ImageError, match="too_large"):
        read_image("x.pfm", pfm)
    float_rgb = cv2.imencode(".tiff", np.full((40, 50, 3), 0.25, np.float32))[1].tobytes()
    assert read_image("f.tif", float_rgb).shape == (40, 50, 3)   # Pillow cannot open it; OpenCV can
    with pytest.raises(ImageError) as error:
        read_image("x.exr", b"\x76\x2f\x31\x01" + bytes(64))
    assert error.value.reason == "unsupported_format"


def test_a_checkpoint_claiming_huge_inputs_is_refused_before_anything_is_built(tmp_path):
    import torch

    from agecli.modeling.checkpoint import load_checkpoint, read_checkpoint

    model = train_tiny_checkpoint(build_store(tmp_path / "run", *synthetic_faces(60, 32)), tmp_path / "m.pt",
                                  size=32, epochs=1, gender=False)
    for key, value, what in (("input_size", 30000, "input_size 30000"), ("std", [0, 1, 1], "std"),
                             ("alignment", {"size": 50000}, "alignment size")):
        payload = read_checkpoint(model)
        payload["spec"][key] = value
        torch.save(payload, tmp_path / "hostile.pt")
        with pytest.raises(AgecliError, match=what):
            load_checkpoint(tmp_path / "hostile.pt")


def test_model_files_that_are_not_tensors_are_refused_in_agecli_words(tmp_path):
    """A whole pickled module, a text file and a checkpoint cut short, given as --model and
    as --init: each refusal says what the file is and what to give, and never repeats
    torch's advice to load with weights_only=False."""
    import torch

    from agecli.modeling.backbones import build_model
    from agecli.modeling.checkpoint import load_checkpoint
    from agecli.modeling.encodings import build_encoding
    from agecli.stages.common import load_init

    model = train_tiny_checkpoint(build_store(tmp_path / "run", *synthetic_faces(60, 32)), tmp_path / "m.pt",
                                  size=32, epochs=1, gender=False)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
    (tmp_path / "notes.pt").write_text("not weights\n")
    (tmp_path / "cut.pt").write_bytes(model.read_bytes()[:2000])
    expected = {"pickled.pt": r"pickled Python object \(torch\.nn\.modules\.linear\.Linear\).*state_dict\(\)",
                "notes.pt": "looks like a text file", "cut.pt": "truncated or damaged zip"}
    target = build_model("mobilenet_v3_small", build_encoding({"name": "ldae"}), gender=False)
    for name, what in expected.items():
        for load in (load_checkpoint, lambda path: load_init(target, path)):
            with pytest.raises(AgecliError, match=what) as error:
                load(tmp_path / name)
            assert "weights_only` set to `False" not in str(error.value)
            assert name in str(error.value)
    # a checkpoint of a newer format says so and what to do ('agecli None' before)
    from agecli.modeling.checkpoint import FORMAT_VERSION, read_checkpoint

    payload = read_checkpoint(model)
    payload["format_version"] = FORMAT_VERSION + 1
    payload.pop("spec", None)
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(AgecliError, match=rf"format {FORMAT_VERSION + 1}; this agecli .* reads format "
                                          rf"{FORMAT_VERSION}\. Upgrade agecli"):
        load_checkpoint(tmp_path / "future.pt")


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    from agecli.recipes import load_recipe, run_recipe

    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\ndescription: *a9\n")
    assert bomb.stat().st_size < 600
    started = time.perf_counter()
    with pytest.raises(AgecliError, match="expands to more than"):
        run_recipe(load_recipe(bomb), tmp_path / "run", dry_run=True)
    assert time.perf_counter() - started < 5
    loop = tmp_path / "loop.yaml"
    loop.write_text("train: &t\n  - name: x\n    arch: *t\n")
    with pytest.raises(AgecliError, match="expands to more than"):
        load_recipe(loop)
    result = agecli("run", str(bomb), "--dry-run", timeout=60)
    assert result.returncode == 2 and "expands to more than" in result.stderr


# --------------------------------------------------------------------------- 4. one writer per stage
def test_a_live_lock_refuses_with_its_holder_and_a_dead_one_is_taken_over(small_run):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = small_run / "bench" / ".lock"
        lock.parent.mkdir()
        lock.write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": "then",
                                    "command": "agecli bench --run x"}))
        with pytest.raises(AgecliError, match=f"pid {holder.pid}.*agecli bench --run x"):
            with Stage(small_run, "bench"):
                pass
        assert json.loads(lock.read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    with Stage(small_run, "bench") as stage:   # the holder is gone: a stale lock
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        stage.complete()
    assert not lock.exists()


def test_shard_locks_exclude_the_full_job_but_not_each_other(tmp_path):
    folder = tmp_path / "prepare"
    folder.mkdir()
    first = StageLock(folder, "shard1of2").acquire()
    second = StageLock(folder, "shard2of2").acquire()
    with pytest.raises(AgecliError, match="being written by another agecli"):
        StageLock(folder, "shard1of2").acquire()
    with pytest.raises(AgecliError, match="being written by another agecli"):
        StageLock(folder).acquire()
    first.release()
    second.release()
    assert sorted(p.name for p in folder.iterdir()) == []
    StageLock(folder).acquire().release()


def _start_prepare(run: Path, limit: int) -> subprocess.Popen:
    # Ctrl-C as at a terminal: a suite started in the background (`cmd &`) passes SIGINT on
    # ignored, and Python then keeps it ignored, so the child would never see it
    return subprocess.Popen([sys.executable, "-m", "agecli", "prepare", "utkface", "--root", str(UTKFACE_DIR),
                             "--run", str(run), "--limit", str(limit), "--size", "32", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_running(run: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    manifest = run / "prepare" / "manifest.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"prepare ended early: {process.communicate()}")
        try:
            if json.loads(manifest.read_text())["status"] == "running":
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    raise AssertionError("prepare never started")


@pytest.mark.slow
@pytest.mark.shared_data
def test_two_prepares_into_one_run_and_signals(tmp_path):
    """A second writer is refused naming the first; SIGTERM and Ctrl-C mark the stage
    interrupted and exit 143 / 130; the next run finishes the job."""
    require_utkface()
    run = tmp_path / "run"
    first = _start_prepare(run, 6000)
    _wait_running(run, first)
    first.send_signal(signal.SIGSTOP)  # held mid-job: on a fast machine it could finish before the signal
    second = agecli("prepare", "utkface", "--root", str(UTKFACE_DIR), "--run", str(run), "--limit", "6000",
                    "--size", "32", "-q")
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
    assert first.poll() is None, "the first prepare ended before it could be signalled"
    first.send_signal(signal.SIGTERM)
    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=60) == 143, first.communicate()
    manifest = read_json(run / "prepare" / "manifest.json")
    assert manifest["status"] == "interrupted" and not (run / "prepare" / ".lock").exists()
    third = _start_prepare(run, 6000)
    _wait_running(run, third)
    third.send_signal(signal.SIGSTOP)
    third.send_signal(signal.SIGINT)
    third.send_signal(signal.SIGCONT)
    assert third.wait(timeout=60) == 130
    assert "interrupted" in third.communicate()[1]
    assert read_json(run / "prepare" / "manifest.json")["status"] == "interrupted"
    last = agecli("prepare", "utkface", "--root", str(UTKFACE_DIR), "--run", str(run), "--limit", "6000",
                  "--size", "32", "--json")
    assert last.returncode == 0, last.stderr
    assert read_json(run / "prepare" / "manifest.json")["status"] == "complete"


# --------------------------------------------------------------------------- 5. a failed check leaves a finished stage alone
def test_a_failure_that_changed_nothing_keeps_a_complete_manifest(small_run):
    with Stage(small_run, "eval", "done") as stage:
        (stage.dir / "metrics.json").write_text("{}")
        stage.complete()
    before = (small_run / "eval" / "done" / "manifest.json").read_bytes()
    with pytest.raises(AgecliError):
        with Stage(small_run, "eval", "done"):
            raise AgecliError("a mistyped option")
    assert (small_run / "eval" / "done" / "manifest.json").read_bytes() == before
    with pytest.raises(KeyboardInterrupt):
        with Stage(small_run, "eval", "done") as stage:
            (stage.dir / "metrics.json").write_text('{"half": 1}')
            raise KeyboardInterrupt
    assert read_json(small_run / "eval" / "done" / "manifest.json")["status"] == "interrupted"


def test_a_mistyped_resume_of_a_finished_model_leaves_it_finished(small_run):
    from agecli.stages.train import train

    fast = dict(epochs=1, batch_size=32, max_batches=2, threads=1, workers=0, device="cpu", precise_bn_batches=0)
    train(small_run, arch="mobilenet", name="done", size=32, options=TrainOptions(**fast))
    manifest = small_run / "train" / "done" / "manifest.json"
    before = manifest.read_bytes()
    with pytest.raises(AgecliError):
        train(small_run, arch="shufflenet", name="done", size=32, options=TrainOptions(**fast, resume=True))
    assert manifest.read_bytes() == before


# --------------------------------------------------------------------------- 6. bad values
@pytest.mark.parametrize("cls, kwargs, message", [
    (TrainOptions, {"threads": 0}, "--threads 0 is out of range"),
    (TrainOptions, {"threads": -1}, "--threads -1 is out of range"),
    (TrainOptions, {"batch_size": 1}, "--batch-size 1 is out of range"),
    (TrainOptions, {"val_batch_size": 0}, "--val-batch-size 0"),
    (TrainOptions, {"workers": -2}, "--workers -2"),
    (TrainOptions, {"device": "gpu"}, "--device 'gpu' is not a device"),
    (PrepareOptions, {"limit": 0}, "--limit 0 is out of range"),
    (PrepareOptions, {"limit": -5}, "--limit -5"),
    (PrepareOptions, {"max_side": -1}, "--max-side -1"),
    (PrepareOptions, {"size": 7}, "--size 7"),
    (PrepareOptions, {"workers": -1}, "--workers -1"),
    (DistillOptions, {"temperature": 0}, "--temperature 0"),
    (DistillOptions, {"alpha": 2}, "--alpha 2"),
    (DistillOptions, {"teacher_device": "tpu"}, "--teacher-device 'tpu'"),
])
def test_options_are_bounded_with_a_message_naming_the_option(cls, kwargs, message):
    with pytest.raises(AgecliError, match=message.replace("(", r"\(")):
        cls(**kwargs)


def test_stage_arguments_are_bounded(small_run, tmp_path):
    from agecli.stages.evaluate import evaluate
    from agecli.stages.train import train

    with pytest.raises(AgecliError, match="--size 7 is too small"):
        train(small_run, arch="mobilenet", size=7, options=TrainOptions(epochs=1, device="cpu"))
    with pytest.raises(AgecliError, match="--size 0 is too small"):
        train(small_run, arch="mobilenet", size=0, options=TrainOptions(epochs=1, device="cpu"))
    # a network whose unpadded strided layers need more than the general minimum says so, by name
    with pytest.raises(AgecliError, match="--size 64 is too small: dlib_facerec takes at least 103 px"):
        train(small_run, arch="dlib_facerec", size=64, options=TrainOptions(epochs=1, device="cpu"))
    with pytest.raises(AgecliError, match="--batch-size 0"):
        evaluate(tmp_path / "any.pt", small_run, batch_size=0)


def test_cli_bad_numbers_exit_2_without_a_traceback(small_run, tmp_path):
    cases = [
        (["train", "--run", str(small_run), "--arch", "mobilenet", "--threads", "-1"], "--threads -1"),
        (["train", "--run", str(small_run), "--arch", "mobilenet", "--size", "7"], "--size"),
        (["prepare", "folder", "--root", str(tmp_path), "--limit", "-5"], "--limit"),
        (["prepare", "folder", "--root", str(tmp_path), "--max-side", "-1"], "--max-side"),
        (["bench", "--run", str(small_run), "--corruption-limit", "-1"], "--corruption-limit"),
        (["eval", "--model", "x.pt", "--run", str(small_run), "--batch-size", "0"], "--batch-size"),
    ]
    for args, needle in cases:
        result = agecli(*args, timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        assert needle in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


def test_an_error_keeps_a_long_path_on_one_line_in_a_narrow_terminal_or_a_log(small_run, tmp_path):
    """rich hard-wrapped errors at the console width, so a long path came out cut in two: in a
    recipe child's log, `agecli run` then quoted 'missi' and 'ng.pt' on separate lines."""
    missing = tmp_path / ("a_folder_with_a_long_name_" * 4) / "missing.pt"
    env = {**os.environ, "COLUMNS": "40"}
    for args in (["eval", "--model", str(missing), "--run", str(small_run)],
                 ["train", "--run", str(small_run), "--arch", "mobilenet", "--init", str(missing)]):
        result = subprocess.run([sys.executable, "-m", "agecli", *args], capture_output=True, text=True,
                                timeout=120, env=env)
        assert result.returncode == 2, result.stderr
        assert any(str(missing) in line and "does not exist" in line for line in result.stderr.splitlines()), \
            result.stderr
    # a success prints its paths and the next command whole too (one line each, to copy)
    onnx = missing.with_name("default.onnx")
    onnx.parent.mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "agecli", "export", "--model", "default", "--out", str(onnx)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith(f"exported {onnx} (") for line in lines), result.stderr
    assert f"next: agecli predict --model {onnx} PHOTO_OR_FOLDER --annotate annotated/" in lines, result.stderr


def test_cuda_without_a_gpu_gives_the_one_device_message(small_run, tmp_path):
    import torch

    from agecli.device import cuda_absent

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model = train_tiny_checkpoint(small_run, tmp_path / "m.pt", size=32, epochs=1, gender=False)
    expected = cuda_absent("cuda")
    for args in (["eval", "--model", str(model), "--run", str(small_run), "--device", "cuda"],
                 ["distill", "--run", str(small_run), "--teacher", str(model), "--device", "cuda", "--epochs", "1"]):
        result = agecli(*args, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert " ".join(expected.split()) in " ".join(result.stderr.split()), result.stderr


# --------------------------------------------------------------------------- 7. the command line
def _commands():
    from typer.main import get_command

    from agecli.cli.app import app

    return get_command(app).commands


def test_help_shows_every_default():
    """Every option that takes a value shows its default (a None default says what it means);
    rich markup ate the bracketed hints before."""
    missing = []
    for name, command in _commands().items():
        for param in command.params:
            flag = getattr(param, "is_flag", False) or getattr(param, "is_bool_flag", False)
            if param.name == "help" or flag or param.required or param.param_type_name == "argument":
                continue
            if param.default is None and not isinstance(param.show_default, str):
                missing.append(f"{name} --{param.name}")
    assert missing == []
    from typer.testing import CliRunner

    from agecli.cli.app import app

    text = CliRunner().invoke(app, ["train", "--help"], terminal_width=250, env={"COLUMNS": "250"}).output
    assert "[default: (the latest under runs/)]" in text and "[default: (torch's choice)]" in text


def test_one_meaning_per_short_flag():
    meaning: dict[str, set[str]] = {}
    for command in _commands().values():
        for param in command.params:
            for opt in [*param.opts, *getattr(param, "secondary_opts", [])]:
                if len(opt) == 2 and opt.startswith("-"):
                    long = [o for o in param.opts if o.startswith("--")]
                    meaning.setdefault(opt, set()).update(long)
    assert {flag: longs for flag, longs in meaning.items() if len(longs) > 1} == {}
    assert meaning["-m"] == {"--model"}


def test_choices_are_validated_and_auto_is_the_default_device(small_run):
    from typer.testing import CliRunner

    from agecli.cli.app import app
    from agecli.cli.commands.bench_cmd import BackendChoice
    from agecli.modeling.encodings import ENCODINGS
    from agecli.options import ENCODING_NAMES
    from agecli.stages.bench import BACKENDS

    assert ENCODING_NAMES == tuple(ENCODINGS) and tuple(b.value for b in BackendChoice) == BACKENDS
    runner = CliRunner()
    for args in (["distill", "--method", "sofft"], ["train", "--arch", "x", "--encoding", "ldea"],
                 ["train", "--arch", "x", "--optimizer", "adam"], ["eval", "-m", "x", "--split", "holdout"],
                 ["prepare", "utkfaces", "--root", "."], ["bench", "--backend", "tensorrt"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "Invalid value" in result.output, (args, result.output)
    commands = _commands()
    for command in ("train", "distill", "eval", "prepare", "quickstart"):
        device = {p.name: p for p in commands[command].params}["device"]
        assert device.default == "auto", command
    assert PrepareOptions().device == TrainOptions().device == "auto"


def test_the_models_table_never_cuts_a_name_in_a_narrow_terminal():
    """`agecli models` is where a user copies an --arch name from; at 80 columns rich used
    to shorten the longest names to 'dlib_facerec3_sli…'."""
    from typer.testing import CliRunner

    from agecli.cli.app import app
    from agecli.modeling.backbones import BACKBONES

    out = CliRunner().invoke(app, ["models"], env={"COLUMNS": "80"}, terminal_width=80)
    assert out.exit_code == 0, out.output
    assert max(len(line) for line in out.output.splitlines()) <= 80
    cells = {cell.strip() for line in out.output.splitlines() for cell in line.split("│")}
    assert set(BACKBONES) <= cells, sorted(set(BACKBONES) - cells)
