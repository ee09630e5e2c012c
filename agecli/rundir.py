"""Run directories: one experiment per folder, one sub-folder and manifest per stage.

    RUN/prepare/manifest.json
    RUN/train/<name>/manifest.json
    RUN/distill/<name>/manifest.json
    RUN/bench/manifest.json

A manifest records the command, its arguments, the agecli version and format version,
start and end times, input fingerprints, the files written and a status. A stage is only
"complete" once every artifact has been renamed into place and the manifest says so, so a
killed run is never mistaken for a finished one. Later stages call `require_stage`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from agecli import FORMAT_VERSION, __version__
from agecli.errors import AgecliError

RUNS_ROOT_ENV = "AGECLI_RUNS"
STAGES = ("prepare", "train", "distill", "eval", "bench", "export")


def runs_root() -> Path:
    return Path(os.environ.get(RUNS_ROOT_ENV, "runs"))


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def write_csv(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame atomically (no index column)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AgecliError(f"{path} does not exist.") from None
    except json.JSONDecodeError as exc:
        raise AgecliError(f"{path} is not valid JSON ({exc}); it may be truncated.") from None


# --------------------------------------------------------------------------- fingerprints
def fingerprint_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex, first 16 characters)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def fingerprint_listing(root: str | os.PathLike, files: list[Path] | None = None) -> str:
    """Cheap fingerprint of a folder: relative names and sizes of its files (not their bytes)."""
    root = Path(root)
    files = sorted(files if files is not None else (p for p in root.rglob("*") if p.is_file()))
    digest = hashlib.sha256()
    for path in files:
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        digest.update(f"{path.relative_to(root)}\t{size}\n".encode())
    return digest.hexdigest()[:16]


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "agecli": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # torch missing is reported elsewhere
        pass
    return info


# --------------------------------------------------------------------------- stages
class Stage:
    """One stage of a run: creates its folder and keeps its manifest honest.

    Use as a context manager; the manifest says "running" until `complete()` is called,
    and "failed" (with the error) if the block raises.
    """

    def __init__(self, run: str | os.PathLike, stage: str, name: str | None = None, *,
                 args: dict[str, Any] | None = None, inputs: dict[str, Any] | None = None):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        self.run = Path(run)
        self.stage = stage
        self.name = name
        self.dir = self.run / stage / name if name else self.run / stage
        self.manifest_path = self.dir / "manifest.json"
        self.manifest: dict[str, Any] = {
            "stage": stage,
            "name": name,
            "status": "running",
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "args": args or {},
            "inputs": inputs or {},
            "agecli_version": __version__,
            "format_version": FORMAT_VERSION,
            "environment": environment(),
            "started": now(),
            "ended": None,
            "files": {},
            "results": {},
        }

    def __enter__(self) -> "Stage":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and self.manifest["status"] != "complete":
            self.manifest["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            self.manifest["error"] = f"{exc_type.__name__}: {exc}"
            self.manifest["ended"] = now()
            self._write()
        return False

    def path(self, name: str) -> Path:
        return self.dir / name

    def set(self, **fields: Any) -> None:
        """Record extra manifest fields (e.g. alignment settings) before completion."""
        self.manifest.update(fields)
        self._write()

    def complete(self, results: dict[str, Any] | None = None, files: list[str] | None = None) -> dict:
        """Mark the stage finished; lists every file in the stage folder with size and hash."""
        if results:
            self.manifest["results"].update(results)
        names = files if files is not None else sorted(
            str(p.relative_to(self.dir)) for p in self.dir.rglob("*")
            if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")
        )
        listing = {}
        for rel in names:
            path = self.dir / rel
            size = path.stat().st_size
            # hashing multi-GB arrays is slow and adds nothing over size+name for a local run
            listing[rel] = {"bytes": size, "sha256": fingerprint_file(path) if size < 64 << 20 else None}
        self.manifest["files"] = listing
        self.manifest["status"] = "complete"
        self.manifest["ended"] = now()
        self._write()
        return self.manifest

    def _write(self) -> None:
        write_json(self.manifest_path, self.manifest)


def read_manifest(stage_dir: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(stage_dir) / "manifest.json")


def require_stage(run: str | os.PathLike, stage: str, name: str | None = None) -> dict[str, Any]:
    """Return the manifest of a finished stage, or explain why it cannot be used."""
    run = Path(run)
    stage_dir = run / stage / name if name else run / stage
    label = f"{stage}/{name}" if name else stage
    hint = {"prepare": f"run `agecli prepare DATASET --root PATH --run {run}` first."}.get(
        stage, f"run `agecli {stage} --run {run}` first.")
    if not (stage_dir / "manifest.json").exists():
        raise AgecliError(f"run {run} has no {label} stage ({stage_dir}/manifest.json is missing); {hint}")
    manifest = read_manifest(stage_dir)
    status = manifest.get("status")
    if status != "complete":
        raise AgecliError(
            f"the {label} stage of run {run} is {status!r}, not complete "
            f"(started {manifest.get('started')}); re-run it: it resumes where it stopped.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise AgecliError(
            f"the {label} stage of run {run} was written by agecli {manifest.get('agecli_version')} "
            f"(format {manifest.get('format_version')}); this agecli {__version__} reads format "
            f"{FORMAT_VERSION}. Re-run the stage with this version.")
    return manifest


def latest_run(root: Path | None = None) -> Path | None:
    """The run under `runs/` whose manifests changed most recently."""
    root = root or runs_root()
    if not root.is_dir():
        return None
    best: tuple[float, Path] | None = None
    for manifest in root.glob("*/*/manifest.json"):
        mtime = manifest.stat().st_mtime
        if best is None or mtime > best[0]:
            best = (mtime, manifest.parent.parent)
    for manifest in root.glob("*/*/*/manifest.json"):
        mtime = manifest.stat().st_mtime
        if best is None or mtime > best[0]:
            best = (mtime, manifest.parent.parent.parent)
    return best[1] if best else None


def resolve_run(run: str | os.PathLike | None) -> Path:
    """`--run` if given, else the most recent run under `runs/` (see `latest_run`)."""
    if run is not None:
        path = Path(run)
        if not path.is_dir():
            raise AgecliError(f"run directory {path} does not exist; create it with `agecli prepare ... --run {path}`.")
        return path
    found = latest_run()
    if found is None:
        raise AgecliError(
            f"no run given and none found under {runs_root()}/; "
            "start one with `agecli prepare DATASET --root PATH` or pass --run DIR.")
    return found


def unique_name(parent: Path, base: str) -> str:
    """`base`, or `base2`, `base3`, ... so an earlier finished result is never overwritten."""
    if not (parent / base).exists():
        return base
    i = 2
    while (parent / f"{base}{i}").exists():
        i += 1
    return f"{base}{i}"
