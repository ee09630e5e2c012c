"""Face reading, detection, choice and alignment, shared by `prepare` and `predict`.

    read_image(path)                 -> RGB uint8, whatever the file (grey, RGBA, CMYK, 16-bit)
    Detector(device=...).detect(imgs) -> per image, a list of Detection(box, score, landmarks)
    pick_face(dets, shape, hint_box)  -> (index, chosen_by)
    align(image, landmarks, Alignment) -> (size, size, 3) crop, landmarks mapped onto a template
    resize_crop(image, size)          -> centre square, resized (for already-aligned crops)

Detection is MTCNN (facenet-pytorch), made faster than a plain `MTCNN.detect` loop by
(1) detecting on a copy scaled down to `max_side` pixels (coordinates are scaled back),
(2) a smallest face size tied to the image size (`min_face_fraction`), which removes the
    finest, most expensive pyramid levels that could only find faces too small to be useful,
(3) batching images of one canvas size through the network in one call (padding to it).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import cv2
import numpy as np

from agecli.device import require_device
from agecli.errors import AgecliError, missing_facenet
from agecli.store import Alignment

cv2.setNumThreads(1)  # workers and torch already use the cores; cv2's own pool only contends

# --------------------------------------------------------------------------- templates
# 5-point templates in normalised [0, 1] crop coordinates, in MTCNN's landmark order:
# eye on the image's left, eye on the image's right, nose tip, mouth left, mouth right.
_ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)

TEMPLATES: dict[str, np.ndarray] = {
    # The standard ArcFace / insightface 112x112 template, divided by 112.
    "arcface5": _ARCFACE_112 / 112.0,
    # Where the landmarks sit in UTKFace's "Aligned & Cropped" 200x200 chips: mean MTCNN
    # landmarks (facenet-pytorch 2.6.0, default thresholds, most confident face) of 400
    # chips (every 47th file of the sorted train pool in ../shared/data/utkface/UTKFace;
    # 398 of 400 detected; per-point std about 0.02-0.03), each padded with a 60-pixel
    # black border first (MTCNN misplaces faces that fill the frame), divided by 200.
    # Aligning with this template and margin 0 frames any face the way UTKFace chips are.
    "utkface_chip": np.array([[0.30097, 0.29277], [0.69422, 0.29349], [0.49061, 0.52172],
                              [0.32467, 0.69550], [0.67038, 0.69603]], dtype=np.float64),
}


def template_points(name: str) -> np.ndarray:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise AgecliError(f"unknown alignment template {name!r}; choose one of {', '.join(sorted(TEMPLATES))}.") from None


# --------------------------------------------------------------------------- reading
class ImageError(Exception):
    """An image that cannot be used; `reason` is the short code written into rejects.csv."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


MAX_PIXELS = 120_000_000  # bigger images are rejected (decompression bombs, scans of posters)
MAX_FILE_BYTES = 512 << 20  # bigger files are rejected before they are read into memory


def read_file_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of an image file, refusing what is not a regular file (a named pipe would
    block forever, a device never end) and files over MAX_FILE_BYTES. ImageError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # opening a FIFO must not wait
    except FileNotFoundError:
        raise ImageError("missing", str(path)) from None
    except OSError as exc:
        raise ImageError("unreadable", f"{exc.__class__.__name__}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a named pipe" if stat.S_ISFIFO(info.st_mode) else "a device" if (
                stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)) else "a socket or other special file"
            raise ImageError("not_a_file", f"{kind}; only regular files are read")
        if info.st_size > MAX_FILE_BYTES:
            raise ImageError("too_large", f"{info.st_size} bytes (limit {MAX_FILE_BYTES >> 20} MB)")
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ImageError("too_large", f"more than {MAX_FILE_BYTES >> 20} MB")
    return data


def read_image(path: str | os.PathLike, data: bytes | None = None) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3), honouring EXIF orientation.

    Grey and RGBA become RGB (alpha dropped), CMYK JPEGs are converted, 16-bit PNG/TIFF
    are scaled to 8 bits. Its size is read from the header of the format OpenCV will decode
    it as, before anything is decoded. Raises ImageError("unreadable" | "truncated" |
    "too_large" | "corrupt" | "unsupported_format" | "not_a_file" | ...).
    """
    if data is None:
        data = read_file_bytes(path)
    if len(data) == 0:
        raise ImageError("empty_file")
    kind = sniff_format(data)
    if kind == "JPEG" and not data[-64:].rstrip(b"\x00\r\n \t").endswith(b"\xff\xd9"):
        # A JPEG normally ends with its end-of-image marker; without it OpenCV silently fills
        # the missing bottom with grey. Some cameras append data after the marker, so let
        # Pillow, which raises on truncation, have the last word (rare, so the cost is fine).
        _pillow_verify_jpeg(data)
    if kind is None:
        image = _read_with_pillow(data)  # OpenCV knows no other format; Pillow checks the size first
    else:
        check_size(data, kind)
        image = _decode_with_opencv(data, kind)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 8:
        raise ImageError("too_small" if image.ndim == 3 else "unreadable", f"shape {image.shape}")
    return np.ascontiguousarray(image)


def _decode_with_opencv(data: bytes, kind: str) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH
    image = _decode_jpeg(buf, flags) if kind == "JPEG" else cv2.imdecode(buf, flags)
    if image is None:
        return _read_with_pillow(data)
    return cv2.cvtColor(_to_uint8(image), cv2.COLOR_BGR2RGB)


# OpenCV picks its decoder by these leading bytes; a file is decoded as what it starts with.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"), (b"\xff\x4f\xff\x51", "JPEG2000"),
    (b"\x59\xa6\x6a\x95", "SUN"), (b"#?RADIANCE", "HDR"), (b"#?RGBE", "HDR"), (b"\x76\x2f\x31\x01", "EXR"),
)


def sniff_format(data: bytes) -> str | None:
    """The format OpenCV would decode `data` as (JPEG, PNG, ..., HDR, PFM), or None for a file
    only Pillow may read."""
    for magic, kind in _SIGNATURES:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "AVIF"
    if len(data) > 2 and data[:1] == b"P" and data[2:3].isspace():
        return {b"F": "PFM", b"f": "PFM", b"7": "PAM"}.get(data[1:2], "PPM" if data[1:2] in b"123456" else None)
    return None


def check_size(data: bytes, kind: str) -> tuple[int, int]:
    """(width, height) from the header of `kind`, refusing images over MAX_PIXELS before they are
    decoded; Pillow reads the header as that format only, so a file cannot pass as another."""
    if kind in ("HDR", "PFM"):
        width, height = _float_header_size(data, kind)
    elif kind == "TIFF":  # Pillow cannot open every TIFF OpenCV reads (3-channel float, for one)
        width, height = _tiff_header_size(data)
    elif kind in ("EXR", "PAM"):
        raise ImageError("unsupported_format", f"{kind} images are not read; convert to PNG or TIFF")
    else:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data), formats=[kind]) as im:
                width, height = im.size
        except Image.DecompressionBombError as exc:
            raise ImageError("too_large", str(exc)) from None
        except Exception as exc:  # Pillow raises assorted types on damaged headers
            raise ImageError("unreadable", f"{kind} header: {exc.__class__.__name__}: {exc}") from None
    if width * height > MAX_PIXELS:
        raise ImageError("too_large", f"{width}x{height} pixels (limit {MAX_PIXELS // 1_000_000} Mpx)")
    return width, height


def _float_header_size(data: bytes, kind: str) -> tuple[int, int]:
    """Width and height from a Radiance HDR header (lines, a blank one, then "-Y H +X W") or a
    PFM header ("PF", "W H", scale); the formats Pillow cannot open."""
    head = data[:8192].split(b"\n")
    try:
        if kind == "PFM":
            tokens = b" ".join(head[:3]).split()
            return int(tokens[1]), int(tokens[2])
        blank = head.index(b"")
        axes = head[blank + 1].split()
        sizes = {axes[0][1:]: int(axes[1]), axes[2][1:]: int(axes[3])}
        return sizes[b"X"], sizes[b"Y"]
    except (ValueError, IndexError, KeyError):
        raise ImageError("unreadable", f"{kind} header without a readable size") from None


def _tiff_header_size(data: bytes) -> tuple[int, int]:
    """ImageWidth and ImageLength of a TIFF's first image (classic or BigTIFF)."""
    import struct

    order = "<" if data[:2] == b"II" else ">"
    try:
        big = struct.unpack(order + "H", data[2:4])[0] == 43
        head, entry, count_fmt = (16, 20, "Q") if big else (8, 12, "H")
        offset = struct.unpack(order + ("Q" if big else "I"), data[head - (8 if big else 4):head])[0]
        count = struct.unpack(order + count_fmt, data[offset:offset + (8 if big else 2)])[0]
        sizes = {}
        for k in range(min(count, 4096)):
            at = offset + (8 if big else 2) + k * entry
            tag, kind = struct.unpack(order + "HH", data[at:at + 4])
            if tag in (256, 257):
                value = data[at + (12 if big else 8):at + entry]
                sizes[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), value[:2 if kind == 3 else 4])[0]
        return sizes[256], sizes[257]
    except (struct.error, KeyError, OverflowError):
        raise ImageError("unreadable", "TIFF header without a readable size") from None


_STDERR_LOCK = threading.Lock()


def _decode_jpeg(buf: np.ndarray, flags: int) -> np.ndarray | None:
    """cv2.imdecode of a JPEG, refusing what libjpeg reports as corrupt. libjpeg decodes damaged
    data (a zeroed stretch, a bad Huffman code) into grey or smeared blocks and only warns on the
    process's stderr, so that stream is read for its warning; other text is passed on."""
    with _STDERR_LOCK, _captured_stderr() as captured:
        image = cv2.imdecode(buf, flags)
    warnings = [line for line in captured if "Corrupt JPEG" in line or "Premature end of JPEG" in line]
    others = [line for line in captured if line not in warnings]  # e.g. a progress bar drawn meanwhile
    if others:
        sys.stderr.write("".join(others))
    if warnings:
        raise ImageError("corrupt", warnings[0].strip())
    return image


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """The lines written to file descriptor 2 (C libraries included) inside the block."""
    lines: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: decode without listening
        yield lines
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines(keepends=True))


def _pillow_verify_jpeg(data: bytes) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except OSError as exc:
        if "truncated" in str(exc).lower() or "broken data stream" in str(exc):
            raise ImageError("truncated", "JPEG data ends early") from None
        raise ImageError("unreadable", str(exc)) from None
    except Exception as exc:  # Pillow raises assorted types on corrupt streams
        raise ImageError("unreadable", f"{exc.__class__.__name__}: {exc}") from None


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if image.dtype in (np.float32, np.float64):
        if not np.isfinite(image).all():
            raise ImageError("corrupt", "the float image holds NaN or infinite values")
        scale = 255.0 if float(image.max(initial=0.0)) <= 1.0 else 1.0
        return np.clip(image * scale, 0, 255).astype(np.uint8)
    raise ImageError("unsupported_depth", str(image.dtype))


def _read_with_pillow(data: bytes) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:  # the header is read; nothing decoded yet
                raise ImageError("too_large", f"{im.size[0]}x{im.size[1]} pixels (limit {MAX_PIXELS // 1_000_000} Mpx)")
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode == "F":
                return np.repeat(_to_uint8(np.asarray(im))[..., None], 3, axis=2)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im).astype(np.float64)
                peak = 65535.0 if arr.max() > 255 else 255.0
                return np.repeat((arr / peak * 255).astype(np.uint8)[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise ImageError("unreadable", "not an image format OpenCV or Pillow can decode") from None
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", str(exc)) from None
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "unreadable"
        raise ImageError(reason, str(exc)) from None


# --------------------------------------------------------------------------- detection
@dataclass
class Detection:
    box: np.ndarray        # (4,) x1 y1 x2 y2 in source pixels
    score: float           # MTCNN probability
    landmarks: np.ndarray  # (5, 2) x y in source pixels, MTCNN order (see TEMPLATES)

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


class Detector:
    """MTCNN over lists of images, batched, on a downscaled copy of each image.

    max_side: images are scaled so their longer side is at most this before detection
      (0 = never). Faces are still found down to `min_face_px` pixels of the scaled copy.
    min_face_fraction: the smallest face searched, as a fraction of the image's shorter side;
      datasets of face crops use a large value (few, cheap pyramid levels), photos a small one.
    pad_fraction: black border added on every side (fraction of the longer side) before
      detection; MTCNN misplaces faces that touch the frame, as in tight face crops.
    min_score: detections below it are dropped (MTCNN's last stage already requires 0.7).
    """

    def __init__(self, device: str = "cpu", *, max_side: int = 960, min_face_fraction: float = 0.05,
                 min_face_px: int = 20, min_score: float = 0.9, thresholds=(0.6, 0.7, 0.7),
                 batch_size: int = 16, keep_all: bool = True, pad_fraction: float = 0.0):
        try:
            from facenet_pytorch import MTCNN
        except ImportError:
            raise missing_facenet() from None
        device = require_device(device)
        self.device = device
        self.max_side = max_side
        self.min_face_fraction = min_face_fraction
        self.min_face_px = min_face_px
        self.min_score = min_score
        self.batch_size = batch_size
        self.keep_all = keep_all
        self.pad_fraction = pad_fraction
        self._mtcnn = MTCNN(keep_all=True, device=device, thresholds=list(thresholds),
                            min_face_size=min_face_px, post_process=False)

    def _scale(self, shape: tuple[int, ...]) -> float:
        side = max(shape[:2])
        return 1.0 if not self.max_side or side <= self.max_side else self.max_side / side

    def detect(self, images: Sequence[np.ndarray], retry: bool = False) -> list[list[Detection]]:
        """Faces in each RGB uint8 image, most confident first (all of them if keep_all).

        retry: images where nothing was found get a second, slower look: contrast stretched
        (dim, hazy photos), padded (faces filling the frame) and with lower thresholds.
        """
        out = self._detect(images)
        if retry:
            misses = [i for i, dets in enumerate(out) if not dets]
            if misses:
                saved = (self.pad_fraction, self._mtcnn.thresholds)
                self.pad_fraction = max(self.pad_fraction, 0.15)
                self._mtcnn.thresholds = [0.5, 0.6, 0.6]
                try:
                    again = self._detect([_stretch(images[i]) for i in misses])
                finally:
                    self.pad_fraction, self._mtcnn.thresholds = saved
                for i, dets in zip(misses, again):
                    out[i] = dets
        return out

    def _detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        out: list[list[Detection]] = [[] for _ in images]
        scaled: list[tuple[int, np.ndarray, float]] = []
        for i, image in enumerate(images):
            s = self._scale(image.shape)
            small = image if s == 1.0 else cv2.resize(
                image, (max(1, round(image.shape[1] * s)), max(1, round(image.shape[0] * s))),
                interpolation=cv2.INTER_AREA)
            pad = int(round(self.pad_fraction * max(small.shape[:2])))
            if pad:
                small = cv2.copyMakeBorder(small, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
            scaled.append((i, small, s, pad))
        # batch images whose scaled shapes are close: pad to a shared canvas (bottom/right)
        scaled.sort(key=lambda t: (t[1].shape[0], t[1].shape[1]))
        for start in range(0, len(scaled), self.batch_size):
            group = scaled[start:start + self.batch_size]
            for sub in _canvas_groups(group):
                self._detect_group(sub, out)
        return out

    def _detect_group(self, group, out) -> None:
        h = max(t[1].shape[0] for t in group)
        w = max(t[1].shape[1] for t in group)
        canvas = np.zeros((len(group), h, w, 3), dtype=np.uint8)
        for k, (_, small, _, _) in enumerate(group):
            canvas[k, :small.shape[0], :small.shape[1]] = small
        min_face = max(self.min_face_px, int(self.min_face_fraction * min(
            min(t[1].shape[0], t[1].shape[1]) - 2 * t[3] for t in group)))
        if min(h, w) < min_face:   # no face of that size fits; MTCNN's image pyramid would be empty and fail
            return
        self._mtcnn.min_face_size = min_face
        boxes, probs, points = self._mtcnn.detect(canvas if len(group) > 1 else canvas[0], landmarks=True)
        if len(group) == 1:
            boxes, probs, points = [boxes], [probs], [points]
        for (i, small, s, pad), b, p, lm in zip(group, boxes, probs, points):
            if b is None:
                continue
            dets = []
            for box, prob, marks in zip(b, p, lm):
                if prob is None or float(prob) < self.min_score:
                    continue
                # boxes may reach past the frame (a face cut by the border); kept unclipped so
                # the box still describes the face's size
                box = (np.asarray(box, dtype=np.float64) - pad) / s
                marks = (np.asarray(marks, dtype=np.float64).reshape(5, 2) - pad) / s
                dets.append(Detection(box=box, score=float(prob), landmarks=marks))
            dets.sort(key=lambda d: -d.score)
            out[i] = dets if self.keep_all else dets[:1]


def _stretch(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, (1, 99))
    return np.clip((image.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1.0)), 0, 255).astype(np.uint8)


def centre_landmarks(shape: tuple[int, ...], fraction: float, template: str = "arcface5") -> np.ndarray:
    """Template landmarks placed in the central square (side `fraction` of the shorter side):
    where the face of a crop centred on it would be (a fallback when detection fails)."""
    h, w = shape[:2]
    side = fraction * min(h, w)
    return template_points(template) * side + np.array([(w - side) / 2, (h - side) / 2])


def _canvas_groups(group):
    """Split a size-sorted group so padding never more than ~doubles an image's area."""
    subs, current = [], []
    for item in group:
        if current:
            h = max(t[1].shape[0] for t in current + [item])
            w = max(t[1].shape[1] for t in current + [item])
            smallest = min(t[1].shape[0] * t[1].shape[1] for t in current + [item])
            if h * w > 1.6 * smallest:
                subs.append(current)
                current = []
        current.append(item)
    if current:
        subs.append(current)
    return subs


# --------------------------------------------------------------------------- choosing
def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def pick_face(dets: Sequence[Detection], shape: tuple[int, ...], hint_box=None,
              min_iou: float = 0.3) -> tuple[int, str]:
    """Index of the face to keep and how it was chosen.

    - one face: "only";
    - a hint box (the dataset's metadata box, in source pixels) overlapping a face with
      IoU >= min_iou: the best-overlapping face, "metadata_box";
    - otherwise the largest face; faces within 10% of the largest area tie, and the tie
      goes to the one whose centre is nearest the image centre: "largest_central".
    Returns (-1, "none") when there is no face.
    """
    if not dets:
        return -1, "none"
    if len(dets) == 1:
        return 0, "only"
    if hint_box is not None:
        hint = np.asarray(hint_box, dtype=np.float64)
        overlaps = [iou(d.box, hint) for d in dets]
        best = int(np.argmax(overlaps))
        if overlaps[best] >= min_iou:
            return best, "metadata_box"
    largest = max(d.area for d in dets)
    cy, cx = shape[0] / 2, shape[1] / 2

    def off_centre(d: Detection) -> float:
        return math.hypot((d.box[0] + d.box[2]) / 2 - cx, (d.box[1] + d.box[3]) / 2 - cy)

    tied = [i for i, d in enumerate(dets) if d.area >= 0.9 * largest]
    return min(tied, key=lambda i: off_centre(dets[i])), "largest_central"


# --------------------------------------------------------------------------- alignment
def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src onto dst
    (Umeyama 1991); returns a 2x3 matrix for cv2.warpAffine. Deterministic, unlike RANSAC."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    var = (s0 ** 2).sum() / len(src)
    scale = float(np.trace(np.diag(sig) @ sign) / var) if var > 0 else 1.0
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def template_pixels(alignment: Alignment) -> np.ndarray:
    """Template landmarks in output pixels: the template is shrunk by (1 + margin) and
    centred, so `margin` is extra context as a fraction of the template crop."""
    pts = template_points(alignment.template)
    return (pts + alignment.margin / 2) / (1 + alignment.margin) * alignment.size


def align(image: np.ndarray, landmarks: np.ndarray, alignment: Alignment) -> np.ndarray:
    """Warp `image` so its 5 landmarks land on the template; (size, size, 3) uint8."""
    if alignment.method == "resize":
        return resize_crop(image, alignment.size)
    size = alignment.size
    m = similarity_transform(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), template_pixels(alignment))
    scale = math.hypot(m[0, 0], m[1, 0])
    if scale < 0.5:
        # shrinking a lot with bilinear warping aliases: first area-resize just the region
        # that lands in the crop, then warp by the remaining (>= 0.5) factor
        inv = cv2.invertAffineTransform(m)
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64)
        src = corners @ inv.T
        x0 = int(max(0, math.floor(src[:, 0].min()) - 2))
        y0 = int(max(0, math.floor(src[:, 1].min()) - 2))
        x1 = int(min(image.shape[1], math.ceil(src[:, 0].max()) + 2))
        y1 = int(min(image.shape[0], math.ceil(src[:, 1].max()) + 2))
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            f = scale * 2
            region = image[y0:y1, x0:x1]
            small = cv2.resize(region, (max(1, round(region.shape[1] * f)), max(1, round(region.shape[0] * f))),
                               interpolation=cv2.INTER_AREA)
            fx, fy = small.shape[1] / region.shape[1], small.shape[0] / region.shape[0]
            # source pixel p maps to small pixel ((p - origin) * f); compose with m
            pre = np.array([[fx, 0, -x0 * fx], [0, fy, -y0 * fy], [0, 0, 1]])
            m_full = np.vstack([m, [0, 0, 1]]) @ np.linalg.inv(pre)
            return cv2.warpAffine(small, m_full[:2], (size, size), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def resize_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Centre square of `image`, resized to (size, size) (for crops that are already aligned)."""
    h, w = image.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    square = image[y0:y0 + side, x0:x0 + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(square, (size, size), interpolation=interp))


def map_points(points: np.ndarray, alignment: Alignment, landmarks: np.ndarray) -> np.ndarray:
    """Where `points` (source pixels) land in the aligned crop (for tests and drawing)."""
    m = similarity_transform(np.asarray(landmarks).reshape(5, 2), template_pixels(alignment))
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ m[:, :2].T + m[:, 2]
