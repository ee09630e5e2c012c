"""Age (and gender) of every face in photos, folders, videos, URLs and webcams.

    predict(["group.jpg", "clips/"])                 -> {"rows": [...], "failed": [...], ...}  (default model)
    predict(["0"], "best.pt", max_frames=100)        webcam 0; "rtsp://..." / "http://..." streams too

Faces are found and measured by `agecli.stages.estimator.AgeEstimator` (one model, one
detector for the whole batch). Folders are searched recursively; a bare number is a webcam
index and a URL is opened by OpenCV (images or streams).

One row per face, the same fields in JSON and CSV (FIELDS): file, frame and time_s (videos
and streams; empty for photos), face (index in its image), track (videos: the face's track),
x1, y1, x2, y2 (the box in pixels), detector_score (MTCNN's probability that it is a face),
age (years; in videos smoothed over the track's last `smooth` frames), age_std (the spread of
the predicted age distribution: the model's uncertainty), age_frame (this frame's own age,
unsmoothed), gender and female_prob (with a gender head).

A photo without a face is listed in `no_face`. A file that cannot be read, or a video that
cannot be opened, is listed in `failed` with the reason, and the others go on. Video
tracking is greedy IoU matching of boxes between consecutive frames. Annotated copies go to
a folder that holds none of the inputs, and none of the user's files unless `force`;
annotated videos are WebM (VP8) where this OpenCV has no H.264 encoder, both playable in
browsers. An existing `out` is replaced only when predict wrote it, unless `force`.
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from agecli.errors import AgecliError
from agecli.modeling.zoo import DEFAULT_MODEL
from agecli.rundir import check_writable
from agecli.stages.estimator import AgeEstimator

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
FIELDS = ["file", "frame", "time_s", "face", "track", "x1", "y1", "x2", "y2", "detector_score", "age", "age_std",
          "age_frame", "gender", "female_prob"]
URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# browser-playable first; mp4v (MPEG-4 part 2) plays in desktop players only
VIDEO_CODECS = (("avc1", ".mp4", "H.264"), ("VP80", ".webm", "VP8"), ("mp4v", ".mp4", "MPEG-4 part 2"))


# --------------------------------------------------------------------------- inputs
def collect_inputs(paths: Sequence[str | os.PathLike]) -> tuple[list[tuple[Any, str]], list[str]]:
    """Expand the inputs into (source, kind): kind "image" | "video" (a Path) or "stream" (a URL,
    or a webcam index as int). Folders are searched recursively, sorted. Returns (inputs,
    skipped files that are neither images nor videos)."""
    found: list[tuple[Any, str]] = []
    skipped: list[str] = []
    if not paths:
        raise AgecliError("no input given: pass photos, videos, folders, URLs or a webcam index.")
    for raw in paths:
        text = os.fspath(raw)
        if not text.strip():   # Path("") is the current folder: an unset variable would read all of it
            raise AgecliError("an input is an empty string (an unset shell variable?); give a photo, video, "
                              "folder, URL or webcam index, e.g. . for the current folder.")
        path = Path(text)
        if URL.match(text):
            found.append((text, "stream"))
        elif path.is_dir():
            for child in _folder_files(path):
                kind = _kind(child)
                if kind:
                    found.append((child, kind))
                else:
                    skipped.append(str(child))
        elif path.is_file():
            found.append((path, "video" if path.suffix.lower() in VIDEO_EXTENSIONS else "image"))
        elif text.isdigit():
            found.append((int(text), "stream"))
        else:
            raise AgecliError(f"input {text} does not exist (a photo, video or folder; a URL; or a webcam index "
                              "such as 0).")
    if not found:  # only folders were given, and they hold nothing agecli reads
        others = f"; it skipped {len(skipped)} other file(s), e.g. {skipped[0]}" if skipped else ""
        raise AgecliError(f"no photo or video in {', '.join(map(os.fspath, paths))} (searched recursively for "
                          f"{', '.join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))}){others}. Convert the "
                          "images to JPEG or PNG, or give the folder that holds them.")
    return found, skipped


def _folder_files(folder: Path) -> list[Path]:
    """The files below `folder`, sorted, in one walk: not hidden ones (macOS's ._IMG.jpg resource
    forks are not photos), and none inside a folder predict annotated (drawn-on copies of inputs)."""
    every = sorted(folder.rglob("*"))
    made = {p.parent for p in every if p.name == ANNOTATED_MARK} - {folder}
    return [p for p in every if p.is_file() and not p.name.startswith(".") and not made & set(p.parents)]


def _kind(path: Path) -> str | None:
    ext = path.suffix.lower()
    return "image" if ext in IMAGE_EXTENSIONS else "video" if ext in VIDEO_EXTENSIONS else None


ANNOTATED_MARK = ".agecli-annotated"  # in an --annotate folder: agecli made it, so it may write there again


def check_outputs(inputs: list[tuple[Any, str]], annotate: Path | None, out: Path | None, force: bool = False) -> None:
    """Refuse outputs that could replace an input or a user's file: an annotate folder holding
    input files, or one agecli did not make that holds files already; --out naming an input,
    or an existing file that is not a result of predict. `force` allows the last two."""
    files = [src for src, kind in inputs if isinstance(src, Path)]
    if annotate is not None:
        folder = annotate.resolve()
        inside = [f for f in files if f.resolve().parent == folder]
        if inside:
            raise AgecliError(f"--annotate {annotate} holds input files (e.g. {inside[0]}): annotated copies would be "
                              "written beside the originals and could replace them. Choose a folder of its own, "
                              "e.g. --annotate annotated/.")
        if annotate.exists() and not annotate.is_dir():
            raise AgecliError(f"--annotate {annotate} is a file; give a folder for the annotated copies.")
        if not force and annotate.is_dir() and not (annotate / ANNOTATED_MARK).exists() and any(annotate.iterdir()):
            raise AgecliError(f"--annotate {annotate} holds files agecli did not write, which annotated copies of the "
                              "same name would replace: give a new or empty folder, or add --force to write there.")
        check_writable(annotate, "--annotate", is_folder=True)
    if out is not None:
        if out.suffix.lower() not in (".json", ".csv"):
            raise AgecliError(f"--out {out}: use a .json or .csv file name.")
        if out.exists() and any(out.resolve() == f.resolve() for f in files):
            raise AgecliError(f"--out {out} is one of the inputs; choose another file name.")
        if out.is_dir():
            raise AgecliError(f"--out {out} is a folder; give a .json or .csv file name.")
        if out.exists() and not force and not _is_predict_result(out):
            raise AgecliError(f"--out {out} exists and is not a result of agecli predict; agecli does not write over "
                              "it unless asked: add --force to replace it, or give another --out.")
        check_writable(out, "--out")


def _is_predict_result(path: Path) -> bool:
    """Whether `path` is what `write_result` writes (so running predict again may replace it)."""
    try:
        with open(path, encoding="utf-8") as handle:
            if path.suffix.lower() == ".csv":
                return handle.readline().rstrip("\r\n") == ",".join(FIELDS)
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("fields") == FIELDS and "rows" in data


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
def draw(image_rgb: np.ndarray, faces: list[dict[str, Any]]) -> np.ndarray:
    """BGR copy of the image with boxes and 'age gender' labels (rows or AgeEstimator records)."""
    import cv2

    canvas = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    scale = max(0.5, min(canvas.shape[:2]) / 800)
    for r in faces:
        x1, y1, x2, y2 = (int(round(v)) for v in (r["box"] if "box" in r else (r["x1"], r["y1"], r["x2"], r["y2"])))
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


# --------------------------------------------------------------------------- rows
def face_rows(faces: list[dict[str, Any]], file: str, frame: int | None = None,
              time_s: float | None = None) -> list[dict[str, Any]]:
    """AgeEstimator records -> rows (FIELDS) of one image or frame."""
    rows = []
    for k, f in enumerate(faces):
        x1, y1, x2, y2 = f["box"]
        rows.append({"file": file, "frame": frame, "time_s": time_s, "face": k, "track": None,
                     "x1": x1, "y1": y1, "x2": x2, "y2": y2, "detector_score": f["detector_score"],
                     "age": f["age"], "age_std": f["age_std"], "age_frame": f["age"], "gender": f["gender"],
                     "female_prob": f["female_prob"]})
    return rows


def _annotated_path(folder: Path, stem: str, suffix: str, taken: set[str]) -> Path:
    name = stem + suffix
    i = 2
    while name in taken:
        name = f"{stem}_{i}{suffix}"
        i += 1
    taken.add(name)
    return folder / name


def _source_name(source: Any) -> str:
    return f"webcam{source}" if isinstance(source, int) else str(source)


# --------------------------------------------------------------------------- predicting
def predict(paths: Sequence[str | os.PathLike], model: str | os.PathLike = DEFAULT_MODEL, *, device: str = "cpu",
            annotate: str | os.PathLike | None = None, smooth: int = 1, every: int = 1,
            min_face_fraction: float = 0.03, max_side: int = 960, min_score: float = 0.9,
            out: str | os.PathLike | None = None, max_frames: int = 0, force: bool = False,
            mirror: bool = False, progress=None) -> dict[str, Any]:
    """Predict every face in `paths`; optionally write annotated copies into `annotate` and the
    result to `out` (.json: the returned object; .csv: its rows). An existing `out` is replaced
    only when predict wrote it, an existing `annotate` folder written into only when agecli made
    it, unless `force`. `mirror`: each face answered as the mean over it and its mirror image. Returns {"rows", "failed", "no_face", "files", "videos", "annotated",
    "notes", ...}."""
    if smooth < 1 or every < 1 or max_frames < 0:
        raise AgecliError(f"--smooth and --every must be >= 1 and --max-frames >= 0 (got {smooth}, {every}, "
                          f"{max_frames}).")
    inputs, skipped = collect_inputs(paths)
    folder = Path(annotate) if annotate else None
    check_outputs(inputs, folder, Path(out) if out is not None else None, force)
    estimator = AgeEstimator(model, device=device, min_score=min_score, min_face_fraction=min_face_fraction,
                             max_side=max_side, mirror=mirror)
    if folder:
        if not folder.is_dir() or not any(folder.iterdir()):  # agecli makes it: mark it as its own
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ANNOTATED_MARK).touch()
    batch = _Batch(estimator, folder, smooth, every, max_frames)
    for done, (source, kind) in enumerate(inputs):
        if progress:
            progress("files", done, len(inputs))
        batch.add(source, kind, progress)
    if progress:
        progress("files", len(inputs), len(inputs))
    result = {"model": str(model), "mirror": mirror, "alignment": estimator.predictor.alignment.to_dict(),
              "files": len(inputs),
              "faces": len(batch.rows), "fields": FIELDS, "rows": batch.rows, "failed": batch.failed,
              "no_face": batch.no_face, "skipped": skipped, "videos": batch.videos, "annotated": batch.annotated,
              "notes": estimator.notes + batch.notes}
    if out is not None:
        write_result(out, result)
        result["out"] = str(out)
    return result


class _Batch:
    """The rows, failures and annotated copies of one predict call, input by input."""

    def __init__(self, estimator: AgeEstimator, folder: Path | None, smooth: int, every: int, max_frames: int):
        self.estimator, self.folder = estimator, folder
        self.smooth, self.every, self.max_frames = smooth, every, max_frames
        self.rows: list[dict[str, Any]] = []
        self.failed: list[dict[str, str]] = []
        self.no_face: list[str] = []
        self.annotated: list[str] = []
        self.videos: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.taken: set[str] = set()

    def add(self, source: Any, kind: str, progress=None) -> None:
        """Predict one input; a file that cannot be read goes to `failed` and the batch goes on."""
        try:
            if kind == "image":
                faces, target = self._image(source)
            else:
                video = _VideoRun(source, self, live=kind == "stream")
                info = video.run(progress)
                self.videos.append(info)
                faces, target = info["faces"], info["annotated"]
                if info.get("note") and info["note"] not in self.notes:
                    self.notes.append(info["note"])
        except AgecliError as exc:
            self.failed.append({"file": _source_name(source), "error": str(exc)})
            return
        if target:
            self.annotated.append(str(target))
        if faces == 0:
            self.no_face.append(_source_name(source))

    def _image(self, path: Path) -> tuple[int, Path | None]:
        """One photo's rows, and its annotated copy (when asked)."""
        import cv2

        from agecli.rundir import atomic_path
        from agecli.stages.estimator import as_rgb

        image = as_rgb(path)
        faces = self.estimator.predict(image)
        self.rows.extend(face_rows(faces, str(path)))
        if not self.folder:
            return len(faces), None
        target = _annotated_path(self.folder, path.stem, ".jpg", self.taken)
        with atomic_path(target) as tmp:
            ok, buf = cv2.imencode(".jpg", draw(image, faces))
            tmp.write_bytes(buf.tobytes())
        return len(faces), target


class _VideoRun:
    """One video or stream: its sampled frames detected `chunk` at a time, faces tracked across
    frames (ages smoothed along a track), rows appended to the batch, an annotated copy written.
    A live stream (webcam, URL) stops at --max-frames or Ctrl-C, keeping what it has."""

    def __init__(self, source: Any, batch: _Batch, *, live: bool = False, chunk: int = 8):
        self.source, self.batch, self.live, self.chunk = source, batch, live, chunk
        self.name = _source_name(source)
        # a track survives 5 *analysed* frames without its face: with --every N that is 5 N video frames
        self.tracker = IouTracker(smooth=batch.smooth, max_gap=5 * batch.every)
        self.fps = 25.0
        self.writer = self.target = self.partial = self.codec = None
        self.faces = 0

    def run(self, progress=None) -> dict[str, Any]:
        import cv2

        capture = cv2.VideoCapture(self.source if isinstance(self.source, int) else str(self.source))
        if not capture.isOpened():
            raise AgecliError(f"cannot open {'stream' if self.live else 'video'} {self.name} (OpenCV could not open "
                              "or decode it); check the file, URL or camera, or convert the video to H.264 MP4 "
                              "(e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`).")
        self.fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0) or None
        interrupted = finished = False
        try:
            frames_read = self._read_all(capture, total, progress)
            finished = True
        except KeyboardInterrupt:
            if not self.live:
                raise
            frames_read, interrupted, finished = self.frames_read, True, True   # Ctrl-C ends a live stream
        finally:
            capture.release()
            self._close(keep=finished)
        if frames_read == 0:
            raise AgecliError(f"{self.name} opened but no frame could be decoded; the file may be damaged.")
        return {"file": self.name, "frames": frames_read, "fps": self.fps, "faces": self.faces,
                "tracks": self.tracker.next_id, "annotated": str(self.target) if self.target else None,
                "codec": self.codec, "interrupted": interrupted,
                "note": None if self.codec in (None, "H.264", "VP8") else
                f"annotated videos are {self.codec} (this OpenCV has no H.264 or VP8 encoder); browsers may "
                "not play them: convert with `ffmpeg -i IN -c:v libx264 OUT.mp4`."}

    def _read_all(self, capture, total: int | None, progress) -> int:
        import cv2

        self.frames_read = 0
        limit = self.batch.max_frames or None
        pending: list[tuple[int, np.ndarray]] = []
        while limit is None or self.frames_read < limit:
            ok, bgr = capture.read()
            if not ok:
                break
            index, self.frames_read = self.frames_read, self.frames_read + 1
            if index % self.batch.every == 0:
                pending.append((index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
                if len(pending) >= self.chunk:
                    self._add(pending)
                    pending = []
                    if progress:
                        progress(f"video {Path(self.name).name}", index + 1, total)
        if pending:
            self._add(pending)
        return self.frames_read

    def _add(self, frames: list[tuple[int, np.ndarray]]) -> None:
        """Detect, predict and track the faces of some frames (index, RGB); draw them into the copy."""
        estimator = self.batch.estimator
        images = [f for _, f in frames]
        for (i, frame), dets in zip(frames, estimator.detector.detect(images)):
            faces = estimator.faces(frame, dets)
            found = face_rows(faces, self.name, i, round(i / self.fps, 3))
            ids = self.tracker.update(i, [f["box"] for f in faces], [r["age_frame"] for r in found])
            for r, f, (t, age) in zip(found, faces, ids):
                r["track"], r["age"] = t, age
                f["age"] = age
            self.batch.rows.extend(found)
            self.faces += len(found)
            if self.batch.folder:
                self._write(draw(frame, faces))

    def _write(self, canvas: np.ndarray) -> None:
        if self.writer is None:  # opened at the first frame, whose size it takes
            stem = f"webcam{self.source}" if isinstance(self.source, int) else Path(str(self.source)).stem or "stream"
            self.writer, suffix, self.codec = open_video_writer(self.batch.folder, stem, self.fps / self.batch.every,
                                                                canvas.shape[1], canvas.shape[0])
            self.target = _annotated_path(self.batch.folder, stem, suffix, self.batch.taken)
            self.partial = self.writer.partial
        self.writer.write(canvas)

    def _close(self, keep: bool) -> None:
        """Finish the annotated copy: renamed into place whole (FFmpeg creates it under the umask),
        or removed when the video was not read to its end (a cut copy would pass for a whole one)."""
        if self.writer is None:
            return
        self.writer.release()
        if keep:
            os.replace(self.partial, self.target)
        else:
            self.partial.unlink(missing_ok=True)


class _Writer:
    """cv2.VideoWriter writing to a hidden partial file (renamed into place when complete)."""

    def __init__(self, writer, partial: Path):
        self._writer, self.partial = writer, partial

    def write(self, frame: np.ndarray) -> None:
        self._writer.write(frame)

    def release(self) -> None:
        self._writer.release()


def open_video_writer(folder: Path, stem: str, fps: float, width: int, height: int) -> tuple[_Writer, str, str]:
    """A writer in the first codec of VIDEO_CODECS this OpenCV can encode: (writer, suffix, codec name)."""
    import cv2

    for fourcc, suffix, codec in VIDEO_CODECS:
        partial = folder / f".{stem}.{os.getpid()}.partial{suffix}"
        with _quiet_stderr():  # a failed codec probe prints FFmpeg's complaints
            writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
        if writer.isOpened():
            return _Writer(writer, partial), suffix, codec
        writer.release()
        partial.unlink(missing_ok=True)
    raise AgecliError("this OpenCV can write no video codec (tried " + ", ".join(c for _, _, c in VIDEO_CODECS)
                      + "); annotate photos only, or install opencv-python-headless from PyPI.")


class _quiet_stderr:
    """Send the process's stderr (file descriptor 2, where C libraries write) to /dev/null."""

    def __enter__(self):
        self.saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        return False


def write_result(path: str | os.PathLike, result: dict[str, Any]) -> Path:
    """The result as JSON (the whole object, as `--json` prints it) or its rows as CSV
    (FIELDS, one column per box coordinate), atomically."""
    import pandas as pd

    from agecli.rundir import write_csv, write_json

    path = Path(path)
    if path.suffix.lower() == ".csv":
        return write_csv(path, pd.DataFrame(result["rows"], columns=FIELDS))
    return write_json(path, {k: v for k, v in result.items() if k != "out"})
