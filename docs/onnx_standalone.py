"""Use an ONNX model exported by `agecli export` without agecli: onnxruntime, OpenCV and numpy
(and facenet-pytorch's MTCNN to find faces and their five landmarks).

    python docs/onnx_standalone.py default.onnx photo.jpg [more photos]

prints one JSON object per face (file, face, box, age, age_std, gender, female_prob), the
same numbers `agecli predict --model default.onnx photo.jpg` gives. Everything the script needs
to know about the model is in the file's metadata, `agecli_inference` (docs/onnx.md):

    input    the input size, channel order (RGB), value range [0, 1]; mean/std are inside the graph
    crop     where the five landmarks go in the crop (template_px), the crop's size, the margin
    outputs  how each output reads: age_raw's support and decoding, which gender index is female

The detector settings below are `agecli predict`'s defaults; use your own detector freely, as
long as it gives MTCNN's five points (eyes, nose tip, mouth corners) in that order.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import cv2
import numpy as np
import onnxruntime as ort

MAX_SIDE, MIN_FACE_FRACTION, MIN_FACE_PX, MIN_SCORE = 960, 0.03, 20, 0.9  # agecli predict's defaults


def load(path: str) -> tuple[ort.InferenceSession, dict]:
    """The model and its `agecli_inference` metadata."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if "agecli_inference" not in meta:
        sys.exit(f"{path} has no agecli_inference metadata: export it with a current `agecli export`.")
    return session, json.loads(meta["agecli_inference"])


def face_detector():
    """facenet-pytorch's MTCNN, set up as agecli predict sets it up."""
    from facenet_pytorch import MTCNN

    return MTCNN(keep_all=True, device="cpu", thresholds=[0.6, 0.7, 0.7], min_face_size=MIN_FACE_PX,
                 post_process=False)


def detect(mtcnn, image_rgb: np.ndarray) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """(box, score, five landmarks) per face, most confident first: MTCNN on a copy scaled to at
    most MAX_SIDE pixels, looking for faces of at least MIN_FACE_FRACTION of its shorter side."""
    h, w = image_rgb.shape[:2]
    s = 1.0 if max(h, w) <= MAX_SIDE else MAX_SIDE / max(h, w)
    small = image_rgb if s == 1.0 else cv2.resize(image_rgb, (max(1, round(w * s)), max(1, round(h * s))),
                                                  interpolation=cv2.INTER_AREA)
    mtcnn.min_face_size = max(MIN_FACE_PX, int(MIN_FACE_FRACTION * min(small.shape[:2])))
    boxes, probs, points = mtcnn.detect(small, landmarks=True)
    if boxes is None:
        return []
    faces = [(np.asarray(b, np.float64) / s, float(p), np.asarray(m, np.float64).reshape(5, 2) / s)
             for b, p, m in zip(boxes, probs, points) if p is not None and p >= MIN_SCORE]
    return sorted(faces, key=lambda f: -f[1])


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) mapping src onto dst (Umeyama), 2x3."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d0.T @ s0 / len(src))
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    var = (s0 ** 2).sum() / len(src)
    scale = float(np.trace(np.diag(sig) @ sign) / var) if var > 0 else 1.0
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def crop(image: np.ndarray, landmarks: np.ndarray, recipe: dict) -> np.ndarray:
    """The face cut out as the model expects: landmarks onto template_px, crop_size square."""
    size = recipe["crop_size"]
    m = similarity(landmarks, np.asarray(recipe["template_px"], np.float64))
    scale = math.hypot(m[0, 0], m[1, 0])
    if scale < 0.5:  # shrinking a lot: area-resize the region that lands in the crop first (less aliasing)
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64)
        src = corners @ cv2.invertAffineTransform(m).T
        x0, y0 = int(max(0, math.floor(src[:, 0].min()) - 2)), int(max(0, math.floor(src[:, 1].min()) - 2))
        x1 = int(min(image.shape[1], math.ceil(src[:, 0].max()) + 2))
        y1 = int(min(image.shape[0], math.ceil(src[:, 1].max()) + 2))
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            region = image[y0:y1, x0:x1]
            small = cv2.resize(region, (max(1, round(region.shape[1] * 2 * scale)),
                                        max(1, round(region.shape[0] * 2 * scale))), interpolation=cv2.INTER_AREA)
            fx, fy = small.shape[1] / region.shape[1], small.shape[0] / region.shape[0]
            pre = np.array([[fx, 0, -x0 * fx], [0, fy, -y0 * fy], [0, 0, 1]])
            m, image = (np.vstack([m, [0, 0, 1]]) @ np.linalg.inv(pre))[:2], small
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of an antialiased bilinear resize (a triangle filter as wide as the
    scale, pixel centres aligned: what PIL and torch's antialias=True compute)."""
    scale = n_in / n_out
    support, inv = (scale, 1 / scale) if scale >= 1 else (1.0, 1.0)
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = scale * (i + 0.5)
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        taps = np.clip(1 - np.abs((np.arange(lo, hi) - centre + 0.5) * inv), 0, None)
        weights[i, lo:hi] = taps / taps.sum()
    return weights


def to_input(face: np.ndarray, info: dict) -> np.ndarray:
    """uint8 crop (S, S, 3) RGB -> float32 (1, 3, size, size) in [0, 1], as the model takes it."""
    size, x = info["input"]["input_size"], face.astype(np.float64) * info["input"]["pixel_scale"]
    rows, cols = resize_weights(x.shape[0], size), resize_weights(x.shape[1], size)
    x = np.stack([rows @ x[..., c] @ cols.T for c in range(3)])  # (3, size, size)
    return x[None].astype(np.float32)


def decode(outputs: dict, info: dict) -> dict:
    """Age (and its spread) from age_raw as the metadata says; P(female) when there is one."""
    raw, how = outputs["age_raw"][0].astype(np.float64), info["outputs"]["age_raw"]
    std = None
    if how["decode"] in ("softmax_expected", "softmax_argmax"):
        p = np.exp(raw - raw.max())
        p, support = p / p.sum(), np.asarray(how["support"], np.float64)
        age = float(p @ support)
        std = float(math.sqrt(p @ (support - age) ** 2))
        if how["decode"] == "softmax_argmax":
            age = float(support[p.argmax()])
    elif how["decode"] == "ordinal_sum":
        above = 1 / (1 + np.exp(-raw))
        age = float(above.sum())
        p, support = -np.diff(np.concatenate([[1.0], above, [0.0]])), np.asarray(how["support"], np.float64)
        std = float(math.sqrt(p.clip(0) @ (support - p.clip(0) @ support) ** 2))
    elif how["decode"] == "linear":
        age = float(raw[0] * how["scale"] + how["offset"])
    else:  # argmax_group
        age = float(how["support"][int(raw.argmax())])
    female = None if "female_prob" not in outputs else float(outputs["female_prob"][0])
    return {"age": age, "age_std": std, "female_prob": female,
            "gender": None if female is None else ("female" if female >= 0.5 else "male")}


def predict(session: ort.InferenceSession, info: dict, image_rgb: np.ndarray, landmarks: np.ndarray) -> dict:
    """One face, given its five landmarks in the image."""
    names = [o.name for o in session.get_outputs()]
    x = to_input(crop(image_rgb, landmarks, info["crop"]), info)
    return decode(dict(zip(names, session.run(names, {info["input"]["name"]: x}))), info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an ONNX file written by `agecli export`")
    parser.add_argument("photos", nargs="+")
    args = parser.parse_args()
    session, info = load(args.model)
    mtcnn = face_detector()
    for path in args.photos:
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            print(f"cannot read {path}", file=sys.stderr)
            continue
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        for k, (box, score, landmarks) in enumerate(detect(mtcnn, image)):
            face = predict(session, info, image, landmarks)
            print(json.dumps({"file": path, "face": k, "box": [round(float(v), 1) for v in box],
                              "detector_score": round(score, 4), **face}))


if __name__ == "__main__":
    main()
