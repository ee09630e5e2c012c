"""agecli predict on real photos (group photos), a photo without a face, bad files and a video."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agecli.errors import AgecliError
from conftest import SHARED_DATA

PHOTOS = SHARED_DATA / "photos"


@pytest.fixture(scope="module")
def model(bench_run):
    return bench_run / "train" / "mobilenet_v3_small" / "best.pt"


def _need_photos():
    pytest.importorskip("facenet_pytorch", reason="MTCNN (facenet-pytorch) not installed")
    if not (PHOTOS / "group1.jpg").exists():
        pytest.skip(f"real photos not found at {PHOTOS} (../shared/data is absent)")


def test_group_photo_and_no_face(model, tmp_path):
    _need_photos()
    import cv2

    from agecli.stages.predict import predict

    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((200, 300, 3), 128, np.uint8))
    out = tmp_path / "faces.csv"
    result = predict([PHOTOS / "group1.jpg", blank], model, annotate=tmp_path / "ann", out=out)
    faces = [r for r in result["rows"] if r["file"].endswith("group1.jpg")]
    assert len(faces) >= 1
    for r in faces:
        x1, y1, x2, y2 = r["box"]
        assert x2 > x1 and y2 > y1 and 0 <= r["age"] <= 100 and r["confidence"] >= 0.9
        assert r["gender"] in ("male", "female") and 0 <= r["female_prob"] <= 1 and r["frame"] is None
    assert result["no_face"] == [str(blank)]
    assert len(result["annotated"]) == 2 and all((tmp_path / "ann" / n).exists() for n in ("group1.jpg", "wall.jpg"))
    written = (tmp_path / "faces.csv").read_text().splitlines()
    assert written[0].startswith("file,frame,time_s,face,track,box,confidence,age") and len(written) == len(faces) + 1
    # the alignment used for photos is the checkpoint's (resize-trained -> utkface_chip template)
    assert result["alignment"]["template"] == "utkface_chip" and result["alignment"]["method"] == "similarity"


def test_bad_inputs(model, tmp_path):
    pytest.importorskip("facenet_pytorch", reason="MTCNN (facenet-pytorch) not installed")
    from agecli.stages.predict import predict

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg at all")
    with pytest.raises(AgecliError, match="broken.jpg"):
        predict([broken], model)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 100)
    with pytest.raises(AgecliError, match="cannot open video .*clip.mp4"):
        predict([video], model)
    with pytest.raises(AgecliError, match="does not exist"):
        predict([tmp_path / "missing.jpg"], model)
    with pytest.raises(AgecliError, match="not an agecli checkpoint"):
        predict([broken], broken)


def test_video_tracking_and_smoothing(model, tmp_path):
    _need_photos()
    import cv2

    from agecli.stages.predict import predict

    photo = cv2.imread(str(PHOTOS / "astronaut.png"))
    photo = cv2.resize(photo, (320, 320))
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 320))
    rng = np.random.default_rng(0)
    for i in range(10):  # the face drifts right and the picture gets a little noisier each frame
        frame = np.roll(photo, 2 * i, axis=1).astype(np.int16) + rng.normal(0, 4, photo.shape).astype(np.int16)
        writer.write(np.clip(frame, 0, 255).astype(np.uint8))
    writer.release()
    result = predict([path], model, smooth=5, annotate=tmp_path / "ann")
    rows = result["rows"]
    assert len({r["frame"] for r in rows}) >= 8  # the face is found in (nearly) every frame
    main = max({r["track"] for r in rows}, key=lambda t: sum(r["track"] == t for r in rows))
    track = [r for r in rows if r["track"] == main]
    assert len(track) >= 8
    raw, smooth = np.array([r["age_raw"] for r in track]), np.array([r["age"] for r in track])
    assert smooth[0] == pytest.approx(raw[0])
    assert smooth[4] == pytest.approx(raw[:5].mean(), abs=1e-4)  # mean of the last 5 frames
    assert np.std(smooth) <= np.std(raw) + 1e-6
    assert result["videos"][0]["frames"] == 10 and (tmp_path / "ann" / "clip.mp4").stat().st_size > 0


def test_onnx_export_predicts_like_checkpoint(model, tmp_path):
    _need_photos()
    from agecli.stages.export import export
    from agecli.stages.predict import predict

    exported = export(model, "onnx", out=tmp_path / "m.onnx")
    a = predict([PHOTOS / "astronaut.png"], model)["rows"]
    b = predict([PHOTOS / "astronaut.png"], exported["path"])["rows"]
    assert len(a) == len(b) >= 1
    assert a[0]["age"] == pytest.approx(b[0]["age"], abs=0.01)


def test_cli_json(model, tmp_path):
    _need_photos()
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "agecli.cli", "predict", "--model", str(model),
                           str(PHOTOS / "astronaut.png"), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["faces"] >= 1 and data["rows"][0]["file"].endswith("astronaut.png")


def test_cuda_asked_for_without_a_gpu_is_refused_in_one_wording(model, monkeypatch):
    import torch

    from agecli.device import require_device, resolve_device
    from agecli.stages.predict import load_predictor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and require_device("auto") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    for ask in (lambda: require_device("cuda:1"), lambda: load_predictor(model, device="cuda")):
        with pytest.raises(AgecliError, match=r"--device cuda(:1)? was asked for but torch sees no CUDA GPU"):
            ask()
