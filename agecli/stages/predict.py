"""Age (and gender) of every face in photos, folders and videos.

    predict(["group.jpg", "clips/"], "best.pt")  -> {"rows": [...], "no_face": [...], ...}

Faces are detected with MTCNN (`agecli.data.faces.Detector`) and cut out exactly as the model's
checkpoint says (`spec.alignment`: template, margin and size). A model trained on crops
that came already aligned (alignment method "resize", e.g. UTKFace chips) is fed crops
warped onto that dataset's landmark template (`utkface_chip`), so a detected face is framed
like the training crops. Models are agecli checkpoints (.pt) or files written by
`agecli export` (.onnx / .torchscript, whose metadata carries the same spec).

One row per face: file, frame (videos; None for photos), time_s, face, track, box
(x1, y1, x2, y2 in pixels), confidence (detection probability), age (smoothed over the
track's last `smooth` frames in videos), age_raw, gender and female_prob (when the model has
a gender head). A photo without a face is listed in `no_face`, not an error; a file that
cannot be read, or a video that cannot be opened, raises AgecliError naming it.
Video tracking is greedy IoU matching of boxes between consecutive frames.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from agecli.device import require_device
from agecli.errors import AgecliError
from agecli.store import Alignment

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
FIELDS = ["file", "frame", "time_s", "face", "track", "box", "confidence", "age", "age_raw", "gender",
          "female_prob"]


# --------------------------------------------------------------------------- the model
@dataclass
class Predictor:
    """A model ready for aligned uint8 crops: `__call__(crops) -> (ages, female_prob or None)`."""

    source: str
    spec: Any
    alignment: Alignment
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    notes: list[str] = field(default_factory=list)

    def __call__(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if len(crops) == 0:
            return np.zeros(0, np.float32), (np.zeros(0, np.float32) if self.spec.gender else None)
        return self.run(crops)


def crop_alignment(spec) -> tuple[Alignment, list[str]]:
    """How to cut faces out of photos for this model (see the module docstring)."""
    from agecli.data.faces import TEMPLATES

    data = dict(spec.alignment or {})
    notes: list[str] = []
    alignment = Alignment.from_dict(data)
    if "size" not in data:
        alignment.size = int(spec.input_size)
    if not data:
        notes.append("the checkpoint records no face alignment; using the utkface_chip template (margin 0).")
        return Alignment("similarity", alignment.size, 0.0, "utkface_chip"), notes
    if alignment.method == "resize":
        template = alignment.template if alignment.template in TEMPLATES else "utkface_chip"
        if template != alignment.template:
            notes.append(f"the model was trained on ready-made crops (template {alignment.template!r}); detected "
                         "faces are aligned to the utkface_chip template, which frames faces like UTKFace chips.")
        margin = alignment.margin if alignment.template in TEMPLATES else 0.0
        return Alignment("similarity", alignment.size, margin, template), notes
    return alignment, notes


def load_predictor(model: str | os.PathLike, *, device: str = "cpu", batch_size: int = 64) -> Predictor:
    """A `Predictor` for an agecli checkpoint (.pt) or a file written by `agecli export`."""
    from agecli.modeling.checkpoint import sniff

    path = Path(model)
    if not path.exists():
        raise AgecliError(f"model file {path} does not exist.")
    device = require_device(device)
    exported_file = path.suffix in (".onnx", ".torchscript", ".ts") or sniff(path) == "an ONNX model"
    # load_checkpoint says what the file is when it is not a checkpoint
    spec, run = (_exported_runner if exported_file else _checkpoint_runner)(path, device, batch_size)
    alignment, notes = crop_alignment(spec)
    return Predictor(str(path), spec, alignment, run, notes)


def _checkpoint_runner(path: Path, device: str, batch_size: int):
    """(spec, run(crops) -> (ages, female_prob or None)) for an agecli checkpoint."""
    from agecli.data.batches import to_input
    from agecli.modeling.checkpoint import load_checkpoint
    from agecli.modeling.decode import decode

    net, spec = load_checkpoint(path, device)
    encoding = spec.build_encoding()

    @torch.inference_mode()
    def run(crops: np.ndarray):
        ages, probs = [], []
        for start in range(0, len(crops), batch_size):
            x = to_input(torch.from_numpy(np.ascontiguousarray(crops[start:start + batch_size])),
                         spec.input_size, spec.mean, spec.std, device=device)
            age, female = decode(net(x), encoding)
            ages.append(age.cpu().numpy())
            if female is not None:
                probs.append(female.cpu().numpy())
        return np.concatenate(ages), (np.concatenate(probs) if probs else None)

    return spec, run


def _exported_runner(path: Path, device: str, batch_size: int):
    """(spec, run(crops) -> (ages, female_prob or None)) for an ONNX or TorchScript export."""
    from agecli.stages.export import load_exported, to_unit

    exported = load_exported(path, device=device)
    spec = exported.spec

    def run(crops: np.ndarray):
        ages, probs = [], []
        for start in range(0, len(crops), batch_size):
            out = exported.run(to_unit(crops[start:start + batch_size], spec.input_size))
            ages.append(out["age"].reshape(-1))
            if "female_prob" in out:
                probs.append(out["female_prob"].reshape(-1))
        return np.concatenate(ages), (np.concatenate(probs) if probs else None)

    return spec, run


# --------------------------------------------------------------------------- inputs
def collect_inputs(paths: Sequence[str | os.PathLike]) -> tuple[list[tuple[Path, str]], list[str]]:
    """Expand folders (recursively, sorted) into (path, "image"|"video"); returns (inputs, skipped files)."""
    found: list[tuple[Path, str]] = []
    skipped: list[str] = []
    if not paths:
        raise AgecliError("no input given: pass photos, videos or folders.")
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                ext = child.suffix.lower()
                if ext in IMAGE_EXTENSIONS:
                    found.append((child, "image"))
                elif ext in VIDEO_EXTENSIONS:
                    found.append((child, "video"))
                elif not child.name.startswith("."):
                    skipped.append(str(child))
        elif path.is_file():
            found.append((path, "video" if path.suffix.lower() in VIDEO_EXTENSIONS else "image"))
        else:
            raise AgecliError(f"input {path} does not exist.")
    return found, skipped


def _read(path: Path) -> np.ndarray:
    from agecli.data.faces import ImageError, read_image

    try:
        return read_image(path)
    except ImageError as exc:
        raise AgecliError(f"cannot read {path} as an image ({exc}); remove it from the inputs or convert it. "
                          f"Videos need one of the extensions {', '.join(sorted(VIDEO_EXTENSIONS))}.") from None


# --------------------------------------------------------------------------- tracking
class IouTracker:
    """Greedy IoU matching of each frame's boxes to the tracks seen in the last `max_gap` frames."""

    def __init__(self, smooth: int = 1, min_iou: float = 0.3, max_gap: int = 5):
        self.smooth, self.min_iou, self.max_gap = max(1, smooth), min_iou, max_gap
        self.tracks: dict[int, dict[str, Any]] = {}
        self.next_id = 0

    def update(self, frame: int, boxes: Sequence[np.ndarray], ages: Sequence[float]) -> list[tuple[int, float]]:
        """(track id, smoothed age) per box."""
        from agecli.data.faces import iou

        live = {t: tr for t, tr in self.tracks.items() if frame - tr["last"] <= self.max_gap}
        pairs = sorted(((iou(b, tr["box"]), i, t) for i, b in enumerate(boxes) for t, tr in live.items()),
                       reverse=True)
        assigned: dict[int, int] = {}
        used: set[int] = set()
        for score, i, t in pairs:
            if score < self.min_iou:
                break
            if i in assigned or t in used:
                continue
            assigned[i] = t
            used.add(t)
        out = []
        for i, (box, age) in enumerate(zip(boxes, ages)):
            t = assigned.get(i)
            if t is None:
                t = self.next_id
                self.next_id += 1
                self.tracks[t] = {"ages": deque(maxlen=self.smooth)}
            track = self.tracks[t]
            track.update(box=np.asarray(box, dtype=float), last=frame)
            track["ages"].append(float(age))
            out.append((t, float(np.mean(track["ages"]))))
        return out


# --------------------------------------------------------------------------- drawing
def draw(image_rgb: np.ndarray, rows: list[dict[str, Any]]) -> np.ndarray:
    """BGR copy of the image with boxes and 'age gender' labels."""
    import cv2

    canvas = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    scale = max(0.5, min(canvas.shape[:2]) / 800)
    for r in rows:
        x1, y1, x2, y2 = (int(round(v)) for v in r["box"])
        color = (60, 60, 230) if r.get("gender") == "female" else (230, 140, 40) if r.get("gender") == "male" \
            else (60, 200, 60)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, max(1, int(2 * scale)))
        label = f"{r['age']:.0f}" + (f" {r['gender'][0].upper()}" if r.get("gender") else "")
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, max(1, int(2 * scale)))
        top = max(0, y1 - th - base - 4)
        cv2.rectangle(canvas, (x1, top), (x1 + tw + 4, top + th + base + 4), color, -1)
        cv2.putText(canvas, label, (x1 + 2, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, (255, 255, 255),
                    max(1, int(2 * scale)), cv2.LINE_AA)
    return canvas


# --------------------------------------------------------------------------- predicting
def _faces_rows(predictor: Predictor, image: np.ndarray, dets, file: str, frame: int | None,
                time_s: float | None) -> list[dict[str, Any]]:
    from agecli.data.faces import align

    if not dets:
        return []
    crops = np.stack([align(image, d.landmarks, predictor.alignment) for d in dets])
    ages, female = predictor(crops)
    rows = []
    for k, (d, age) in enumerate(zip(dets, ages)):
        row = {"file": file, "frame": frame, "time_s": time_s, "face": k, "track": None,
               "box": [round(float(v), 1) for v in d.box], "confidence": round(float(d.score), 4),
               "age": float(age), "age_raw": float(age), "gender": None, "female_prob": None}
        if female is not None:
            row["female_prob"] = float(female[k])
            row["gender"] = "female" if female[k] >= 0.5 else "male"
        rows.append(row)
    return rows


def _annotated_path(folder: Path, source: Path, suffix: str, taken: set[str]) -> Path:
    name = source.stem + suffix
    i = 2
    while name in taken:
        name = f"{source.stem}_{i}{suffix}"
        i += 1
    taken.add(name)
    return folder / name


def predict(paths: Sequence[str | os.PathLike], model: str | os.PathLike, *, device: str = "cpu",
            annotate: str | os.PathLike | None = None, smooth: int = 1, every: int = 1,
            min_face_fraction: float = 0.03, max_side: int = 960, min_score: float = 0.9,
            out: str | os.PathLike | None = None, progress=None) -> dict[str, Any]:
    """Predict every face in `paths`; optionally write annotated copies into `annotate` and the rows
    to `out` (.json or .csv). Returns {"rows", "no_face", "files", "videos", "annotated", "notes", ...}."""
    from agecli.data.faces import Detector

    if smooth < 1 or every < 1:
        raise AgecliError(f"--smooth and --every must be >= 1 (got {smooth}, {every}).")
    if out is not None and Path(out).suffix.lower() not in (".json", ".csv"):
        raise AgecliError(f"--out {out}: use a .json or .csv file name.")
    inputs, skipped = collect_inputs(paths)
    predictor = load_predictor(model, device=device)
    detector = Detector(device=device, max_side=max_side, min_face_fraction=min_face_fraction, min_score=min_score)
    folder = Path(annotate) if annotate else None
    if folder:
        folder.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    rows: list[dict[str, Any]] = []
    no_face, annotated, videos = [], [], []
    for done, (path, kind) in enumerate(inputs):
        if progress:
            progress("files", done, len(inputs))
        if kind == "image":
            found, target = _predict_image(path, predictor, detector, folder, taken)
            rows.extend(found)
            faces = len(found)
        else:
            video = _VideoRun(path, predictor, detector, folder, taken, smooth, every, rows)
            info = video.run(progress)
            videos.append(info)
            target, faces = info["annotated"], info["faces"]
        if target:
            annotated.append(str(target))
        if faces == 0:
            no_face.append(str(path))
    if progress:
        progress("files", len(inputs), len(inputs))
    result = {"model": str(model), "alignment": predictor.alignment.to_dict(), "files": len(inputs),
              "faces": len(rows), "rows": rows, "no_face": no_face, "skipped": skipped, "videos": videos,
              "annotated": annotated, "notes": predictor.notes}
    if out is not None:
        write_rows(out, rows)
        result["out"] = str(out)
    return result


def _predict_image(path: Path, predictor: Predictor, detector, folder: Path | None,
                   taken: set[str]) -> tuple[list[dict[str, Any]], Path | None]:
    """The rows of one photo's faces, and its annotated copy in `folder` (when given)."""
    import cv2

    from agecli.rundir import atomic_path

    image = _read(path)
    found = _faces_rows(predictor, image, detector.detect([image])[0], str(path), None, None)
    if not folder:
        return found, None
    target = _annotated_path(folder, path, ".jpg", taken)
    with atomic_path(target) as tmp:
        ok, buf = cv2.imencode(".jpg", draw(image, found))
        tmp.write_bytes(buf.tobytes())
    return found, target


class _VideoRun:
    """One video: its sampled frames detected `chunk` at a time, faces tracked across frames
    (ages smoothed along a track), rows appended to `rows`, and an annotated copy in `folder`."""

    def __init__(self, path: Path, predictor: Predictor, detector, folder: Path | None, taken: set[str],
                 smooth: int, every: int, rows: list[dict[str, Any]], chunk: int = 8):
        self.path, self.predictor, self.detector, self.rows = path, predictor, detector, rows
        self.folder, self.taken, self.every, self.chunk = folder, taken, every, chunk
        self.tracker = IouTracker(smooth=smooth)
        self.fps = 25.0
        self.writer = self.target = None
        self.faces = 0

    def run(self, progress=None) -> dict[str, Any]:
        import cv2

        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            raise AgecliError(f"cannot open video {self.path} (OpenCV could not decode it); check the file, or "
                              "convert it to H.264 MP4 (e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`).")
        self.fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        frames_read = 0
        pending: list[tuple[int, np.ndarray]] = []
        try:
            while True:
                ok, bgr = capture.read()
                if not ok:
                    break
                index, frames_read = frames_read, frames_read + 1
                if index % self.every == 0:
                    pending.append((index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
                    if len(pending) >= self.chunk:
                        self._add(pending)
                        pending = []
                        if progress:
                            progress(f"video {self.path.name}", index + 1, total or None)
            if pending:
                self._add(pending)
        finally:
            capture.release()
            if self.writer is not None:
                self.writer.release()
        if frames_read == 0:
            raise AgecliError(f"video {self.path} opened but no frame could be decoded; the file may be damaged.")
        return {"file": str(self.path), "frames": frames_read, "fps": self.fps, "faces": self.faces,
                "tracks": self.tracker.next_id, "annotated": str(self.target) if self.target else None}

    def _add(self, frames: list[tuple[int, np.ndarray]]) -> None:
        """Detect, predict and track the faces of some frames (index, RGB); draw them into the copy."""
        for (i, frame), dets in zip(frames, self.detector.detect([f for _, f in frames])):
            found = _faces_rows(self.predictor, frame, dets, str(self.path), i, round(i / self.fps, 3))
            ids = self.tracker.update(i, [r["box"] for r in found], [r["age_raw"] for r in found])
            for r, (t, age) in zip(found, ids):
                r["track"], r["age"] = t, age
            self.rows.extend(found)
            self.faces += len(found)
            if self.folder:
                self._write(draw(frame, found))

    def _write(self, canvas: np.ndarray) -> None:
        import cv2

        if self.writer is None:  # opened at the first frame, whose size it takes
            self.target = _annotated_path(self.folder, self.path, ".mp4", self.taken)
            self.writer = cv2.VideoWriter(str(self.target), cv2.VideoWriter_fourcc(*"mp4v"), self.fps / self.every,
                                          (canvas.shape[1], canvas.shape[0]))
        self.writer.write(canvas)


def write_rows(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Rows as JSON (a list) or CSV (box as 'x1 y1 x2 y2'), atomically."""
    import pandas as pd

    from agecli.rundir import write_csv, write_json

    path = Path(path)
    if path.suffix.lower() == ".csv":
        frame = pd.DataFrame([{**r, "box": " ".join(str(v) for v in r["box"])} for r in rows], columns=FIELDS)
        return write_csv(path, frame)
    return write_json(path, rows)
