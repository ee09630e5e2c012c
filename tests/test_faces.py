"""Reading odd images, choosing faces, aligning them (and MTCNN on a real photo)."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from agecli.data.faces import (TEMPLATES, Detection, ImageError, align, iou, map_points, pick_face,
                          read_image, resize_crop, similarity_transform, template_pixels)
from agecli.store import Alignment

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _encode(ext: str, array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, array)
    assert ok
    return buf.tobytes()


def test_read_odd_images(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    grey = read_image("g", _encode(".png", rgb[..., 0]))
    assert grey.shape == (40, 60, 3) and grey.dtype == np.uint8
    deep = read_image("d", _encode(".png", np.full((20, 30, 3), 40000, np.uint16)))
    assert deep.dtype == np.uint8 and deep[0, 0, 0] == 40000 >> 8
    rgba = read_image("a", _encode(".png", np.dstack([rgb, np.full((40, 60), 128, np.uint8)])))
    assert rgba.shape == (40, 60, 3)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=95)
    cmyk = read_image("c", buf.getvalue())
    assert cmyk.shape == (40, 60, 3) and abs(float(cmyk.mean()) - float(rgb.mean())) < 10
    bgr = read_image("p", _encode(".png", rgb))
    assert np.array_equal(bgr, rgb[..., ::-1])  # files are BGR to cv2, RGB out


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_file"),
    (b"definitely not an image" * 4, "unreadable"),
])
def test_read_errors(data, reason):
    with pytest.raises(ImageError) as err:
        read_image("x", data)
    assert err.value.reason == reason


def test_truncated_jpeg_and_missing_file(tmp_path):
    data = _encode(".jpg", np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(ImageError) as err:
        read_image("t", data[: len(data) // 2])
    assert err.value.reason == "truncated"
    assert read_image("ok", data + b"\x00trailing camera data\x00").shape == (64, 64, 3)
    with pytest.raises(ImageError) as err:
        read_image(tmp_path / "nope.jpg")
    assert err.value.reason == "missing"


def test_similarity_and_align_put_landmarks_on_template():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    al = Alignment(size=96, margin=0.4, template="arcface5")
    target = template_pixels(al)
    # landmarks = template rotated by 20 degrees, scaled x2.5, shifted
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    marks = (target @ rot.T) * 2.5 + np.array([120, 40])
    m = similarity_transform(marks, target)
    assert np.allclose(marks @ m[:, :2].T + m[:, 2], target, atol=1e-6)
    assert np.allclose(map_points(marks, al, marks), target, atol=1e-6)
    crop = align(image, marks, al)
    assert crop.shape == (96, 96, 3) and crop.dtype == np.uint8
    # the big-shrink path (area pre-resize) must land the same pixels as a plain warp
    plain = cv2.warpAffine(cv2.GaussianBlur(image, (0, 0), 1.0), m, (96, 96))
    assert np.abs(crop.astype(int) - plain.astype(int)).mean() < 40
    assert align(image, marks, Alignment(method="resize", size=32)).shape == (32, 32, 3)


def test_margin_adds_context():
    al0, al1 = Alignment(size=100, margin=0.0), Alignment(size=100, margin=1.0)
    spread0 = np.ptp(template_pixels(al0)[:, 0])
    spread1 = np.ptp(template_pixels(al1)[:, 0])
    assert spread1 == pytest.approx(spread0 / 2)
    for name, pts in TEMPLATES.items():
        assert pts.shape == (5, 2) and (pts > 0).all() and (pts < 1).all(), name
        assert pts[0, 0] < pts[1, 0] and pts[3, 0] < pts[4, 0] and pts[0, 1] < pts[2, 1] < pts[3, 1]


def test_resize_crop():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, 50:150] = 255
    out = resize_crop(img, 50)
    assert out.shape == (50, 50, 3) and out.min() == 255


def _det(x1, y1, x2, y2, score=0.99):
    return Detection(box=np.array([x1, y1, x2, y2], float), score=score, landmarks=np.zeros((5, 2)))


def test_pick_face_rules():
    shape = (400, 400, 3)
    assert pick_face([], shape) == (-1, "none")
    assert pick_face([_det(0, 0, 10, 10)], shape) == (0, "only")
    dets = [_det(0, 0, 100, 100), _det(150, 150, 245, 245), _det(300, 300, 330, 330)]
    # largest (100^2) and second (95^2 > 0.9 * 100^2) tie; the central one wins
    assert pick_face(dets, shape) == (1, "largest_central")
    assert pick_face(dets, shape, hint_box=(295, 295, 335, 335)) == (2, "metadata_box")
    # a hint that overlaps nothing falls back to the rule
    assert pick_face(dets, shape, hint_box=(380, 0, 399, 20))[1] == "largest_central"
    assert iou(np.array([0, 0, 10, 10]), np.array([5, 0, 15, 10])) == pytest.approx(1 / 3)


@pytest.mark.shared_data
def test_mtcnn_on_real_photo():
    path = SHARED / "photos" / "astronaut.png"
    if not path.exists():
        pytest.skip(f"real photos not found at {SHARED / 'photos'}")
    pytest.importorskip("facenet_pytorch", reason="facenet-pytorch is not installed")
    from agecli.data.faces import Detector

    image = read_image(path)
    big = cv2.resize(image, (1024, 1024))  # detection runs on a 512 copy; boxes must scale back
    det = Detector(max_side=512, min_face_fraction=0.1)
    (small_dets, big_dets) = det.detect([image, big])
    assert len(small_dets) == 1 and len(big_dets) == 1 and small_dets[0].score > 0.95
    assert np.allclose(big_dets[0].box / 2, small_dets[0].box, atol=6)
    eyes = small_dets[0].landmarks[:2]
    assert eyes[0, 0] < eyes[1, 0]
    al = Alignment(size=112, margin=0.0)
    crop = align(image, small_dets[0].landmarks, al)
    # re-detecting in the aligned crop finds the landmarks near the template
    (again,) = Detector(max_side=0, min_face_fraction=0.2, pad_fraction=0.3).detect([crop])
    assert again and np.abs(again[0].landmarks - template_pixels(al)).max() < 8
