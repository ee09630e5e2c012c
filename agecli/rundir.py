"""Run directories: one experiment per folder, one sub-folder and manifest per stage.

    RUN/prepare/manifest.json
    RUN/train/<name>/manifest.json
    RUN/distill/<name>/manifest.json
    RUN/bench/manifest.json

A manifest records the command, its arguments, the agecli version and format version,
start and end times, input fingerprints, the files written and a status. Its "reads" names
the models and runs the stage read with their identity then, so a stage whose inputs were
later retrained is known to be out of date (`changed_reads`). A stage is only
"complete" once every artifact has been renamed into place and the manifest says so, so a
killed run is never mistaken for a finished one. Later stages call `require_stage`.

What a stage may write is bounded here, once for every stage: its folder's name is a plain
name (`check_name`: no `..`, no `/`), a folder that holds files but no agecli manifest is the
user's and is refused, one process writes a stage folder at a time (`StageLock`, a `.lock`
file naming the holder; a dead holder's lock is taken over), and every file is written
atomically (`atomic_path`) with the permissions of any other new file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

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
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are as readable as any other file
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike, what: str, *, is_folder: bool = False) -> None:
    """Refuse, before any work, an output that could not be written at the end: the nearest
    existing folder of file `path` (or of folder `path`, with `is_folder`) must be one this
    process can create files in (probed with a temporary file, which also catches read-only
    mounts and /proc)."""
    folder = Path(path) if is_folder else Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise AgecliError(f"{what} {path}: {folder} is a file, not a folder; choose another place.")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise AgecliError(f"{what} {path}: cannot write into {folder} ({exc.strerror or exc}); "
                          "choose another place.") from None


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
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


def data_fingerprint(prepare_manifest: dict[str, Any], prepare_dir: str | os.PathLike) -> str:
    """Identity of a run's prepared faces: the hash of records.csv (faces and labels) from the
    prepare manifest, and the size of faces.npy."""
    files = prepare_manifest.get("files", {})
    digest = (files.get("records.csv") or {}).get("sha256")
    if digest:
        faces = (files.get("faces.npy") or {}).get("bytes")
        return f"records:{digest}/faces:{faces}B"
    return f"records:{fingerprint_file(Path(prepare_dir) / 'records.csv')}"


@functools.lru_cache(maxsize=256)
def _file_identity(path: str, size: int, mtime_ns: int) -> str:
    return fingerprint_file(path)   # keyed on size and mtime: a plan hashes each teacher once


def identify(path: str | os.PathLike) -> str | None:
    """What a stage records of something it read, to tell later whether it changed: a file's
    hash, a run folder's data fingerprint; None for anything else (gone, or neither)."""
    path = Path(path)
    try:
        if path.is_file():
            info = path.stat()
            return _file_identity(str(path.resolve()), info.st_size, info.st_mtime_ns)
        prepare = path / "prepare" / "manifest.json"
        if prepare.is_file():
            manifest = json.loads(prepare.read_text(encoding="utf-8"))
            if manifest.get("status") == "complete":
                return data_fingerprint(manifest, prepare.parent)
    except (OSError, ValueError):
        return None
    return None


PACKAGE_DIR = Path(__file__).resolve().parent
IN_PACKAGE = "agecli:"   # a read of a file agecli ships (the default model): found in this installation


def changed_reads(manifest: dict[str, Any], run: str | os.PathLike) -> list[Path]:
    """The files and runs a finished stage of `run` read (its manifest's "reads") that have
    changed or gone since: its results are out of date."""
    return [path for path, identity in ((_read_path(key, run), identity)
                                        for key, identity in (manifest.get("reads") or {}).items())
            if identify(path) != identity]


def _read_path(key: str, run: str | os.PathLike) -> Path:
    if key.startswith(IN_PACKAGE):
        return PACKAGE_DIR / key[len(IN_PACKAGE):]
    return Path(key) if Path(key).is_absolute() else Path(run) / key


def shown_in_run(path: str | os.PathLike, run: str | os.PathLike) -> str:
    """A path as messages show it: relative to the run where it is inside it (`train/t1/best.pt`;
    the run folder itself stands for its prepared faces)."""
    try:
        inside = Path(path).resolve().relative_to(Path(run).resolve())
    except ValueError:
        return str(path)
    return str(inside) if inside.parts else "the run's faces"


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


# --------------------------------------------------------------------------- names and run folders
def check_name(name: Any, what: str = "--name") -> str:
    """`name` if it is a plain file name (one folder level, inside its parent), else AgecliError.

    Every user-given name that becomes a folder (train/eval/distill --name, recipe step names)
    passes here, so none can climb out of the run (`..`, `/abs`, `a/../../b`) or land in a
    nested folder that later stages do not look in (`a/b`)."""
    text = name if isinstance(name, str) else ""
    bad = (not text.strip() or text in (".", "..") or "/" in text or "\\" in text or "\x00" in text
           or text.startswith(".") or text != text.strip() or any(ord(c) < 32 for c in text)
           or os.path.isabs(text) or len(text.encode()) > 200)
    if bad:
        raise AgecliError(f"{what} {name!r} is not a plain folder name: use letters, digits, '-', '_' and '.' "
                          "(no '/', no '..', not starting with '.', at most 200 bytes), e.g. resnet50-try2.")
    return text


def check_run_dir(run: str | os.PathLike, what: str = "--run") -> Path:
    """`run` as a Path, refusing a path that exists but is not a folder (a run is a folder)."""
    path = Path(run)
    if path.exists() and not path.is_dir():
        raise AgecliError(f"{what} {path} is a file, not a run folder; give a folder (new or from an earlier "
                          "stage), e.g. --run runs/mine.")
    return path


# --------------------------------------------------------------------------- locks
LOCK_NAME = ".lock"


class StageLock:
    """One writer per stage folder: a lock file holding the writer's pid, host and command.

    `key=None` is exclusive. A keyed lock (prepare's "--shard I/N" jobs) excludes the exclusive
    lock and the same key only, so shards of one run work side by side. A lock whose process
    has died (same host, pid gone) is stale and taken over.
    """

    def __init__(self, folder: Path, key: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / (LOCK_NAME if key is None else f"{LOCK_NAME}.{key}")
        self.exclusive = key is None
        self.held = False

    def acquire(self) -> "StageLock":
        self._create()
        try:
            self._refuse_others()
        except BaseException:
            self.release()
            raise
        return self

    def check(self) -> None:
        """Refuse now if another process holds a conflicting lock (before slow preparations;
        `acquire` still decides)."""
        holder = _live_holder(self.path)
        if holder is not None and holder.get("pid") != os.getpid():
            raise AgecliError(_lock_message(self.folder, self.path, holder))
        self._refuse_others()

    def _refuse_others(self) -> None:
        for other in self.folder.glob(f"{LOCK_NAME}*"):
            if other != self.path and (self.exclusive or other.name == LOCK_NAME):
                holder = _live_holder(other)
                if holder is not None:
                    raise AgecliError(_lock_message(self.folder, other, holder))

    def _create(self) -> None:
        record = json.dumps({"pid": os.getpid(), "host": platform.node(), "started": now(),
                             "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _live_holder(self.path)
                if holder is not None:
                    raise AgecliError(_lock_message(self.folder, self.path, holder)) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(record + "\n")
            self.held = True
            return
        raise AgecliError(f"{self.path} keeps reappearing; another agecli is starting in {self.folder}. Try again.")

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if self.held:
            self.held = False
            holder = _read_lock(self.path)
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _live_holder(path: Path) -> dict[str, Any] | None:
    """The lock's record when its process may still run; None when the lock is stale or gone.
    A lock being written this instant (empty) counts as live; one from another host too,
    since its pid cannot be checked from here."""
    holder = _read_lock(path)
    if holder is None:
        return {"pid": "?", "command": "(starting)", "started": "now"} if path.exists() else None
    if holder.get("host") != platform.node():
        return holder
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return None
    except (PermissionError, ValueError, TypeError, OverflowError):
        return holder
    return holder


def _lock_message(folder: Path, path: Path, holder: dict[str, Any]) -> str:
    return (f"{folder} is being written by another agecli (pid {holder.get('pid')} on {holder.get('host', '?')}, "
            f"`{holder.get('command')}`, since {holder.get('started')}); two writers would corrupt it. Wait for "
            f"it to finish or stop it, or use another --run / --name. If that process no longer exists, "
            f"delete {path}.")


# --------------------------------------------------------------------------- stages
class Stage:
    """One stage of a run: creates its folder and keeps its manifest honest.

    Use as a context manager. Entering refuses a folder agecli did not write (no agecli
    manifest) and a folder another process is writing (StageLock); the manifest says
    "running" until `complete()` is called, "interrupted" after Ctrl-C or SIGTERM and "failed"
    (with the error) when the block raises otherwise. A failure that changed no file of an
    already complete stage (a mistyped option) puts its manifest back as it was.
    """

    def __init__(self, run: str | os.PathLike, stage: str, name: str | None = None, *,
                 args: dict[str, Any] | None = None, inputs: dict[str, Any] | None = None,
                 reads: Sequence[str | os.PathLike | None] = (), lock_key: str | None = None):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        self.run = check_run_dir(run)
        self.stage = stage
        self.name = check_name(name) if name is not None else None
        self.dir = self.run / stage / self.name if self.name else self.run / stage
        self.manifest_path = self.dir / "manifest.json"
        self.lock = StageLock(self.dir, lock_key)
        self._previous: tuple[bytes, dict[str, tuple[int, int]]] | None = None
        self.manifest: dict[str, Any] = {
            "stage": stage,
            "name": self.name,
            "status": "running",
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "args": args or {},
            "inputs": inputs or {},
            "reads": recorded_reads(reads, self.run),
            "agecli_version": __version__,
            "format_version": FORMAT_VERSION,
            "environment": environment(),
            "started": now(),
            "ended": None,
            "files": {},
            "results": {},
        }

    def check(self) -> "Stage":
        """Refuse now what entering would refuse (a folder that is not agecli's, another writer),
        so a stage can say so before its slow work rather than after it."""
        self._refuse_foreign()
        if self.dir.is_dir():
            self.lock.check()
        return self

    def __enter__(self) -> "Stage":
        self._refuse_foreign()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            self._previous = self._finished_state()
            self._write()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc is not None and self.manifest["status"] != "complete":
                if self._previous is not None and self._snapshot() == self._previous[1]:
                    write_bytes(self.manifest_path, self._previous[0])  # nothing changed: still complete
                else:
                    self.manifest["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                    self.manifest["error"] = f"{exc_type.__name__}: {exc}"
                    self.manifest["ended"] = now()
                    self._write()
        finally:
            self.lock.release()
        return False

    def _refuse_foreign(self) -> None:
        """A folder that exists with content but without this stage's agecli manifest is the
        user's: never written into."""
        if self.dir.exists() and not self.dir.is_dir():
            raise AgecliError(f"{self.dir} is a file; agecli needs that path for its {self.stage} stage and does "
                              "not replace files it did not write. Move it, or use another --run / --name.")
        if not self.dir.is_dir() or not any(not p.name.startswith(LOCK_NAME) for p in self.dir.iterdir()):
            return
        try:
            old = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if not (isinstance(old, dict) and old.get("stage") == self.stage and "format_version" in old):
            raise AgecliError(f"{self.dir} exists but was not written by agecli's {self.stage} stage (no agecli "
                              "manifest.json); agecli does not write over files it did not create. Move it, or "
                              "use another --run / --name.")

    def _finished_state(self) -> tuple[bytes, dict[str, tuple[int, int]]] | None:
        """The manifest bytes and file listing of a complete stage this run might redo, else None."""
        try:
            raw = self.manifest_path.read_bytes()
            complete = json.loads(raw).get("status") == "complete"
        except (OSError, ValueError, AttributeError):
            return None
        return (raw, self._snapshot()) if complete else None

    def _snapshot(self) -> dict[str, tuple[int, int]]:
        """(bytes, mtime) of every file of the stage but its manifest and locks."""
        out = {}
        for path in self.dir.rglob("*"):
            if path.is_file() and path != self.manifest_path and not path.name.startswith(LOCK_NAME):
                info = path.stat()
                out[str(path.relative_to(self.dir))] = (info.st_size, info.st_mtime_ns)
        return out

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


def recorded_reads(paths: Sequence[str | os.PathLike | None], run: Path) -> dict[str, str]:
    """Path -> identity of each model file and run among `paths` (others are left out: a
    built-in teacher's name, a plain image folder). Paths inside `run` are kept relative to
    it ("." for the run itself), so a run folder moved or copied elsewhere stays current, and
    files agecli ships relative to the package, so another installation is compared by content."""
    out = {}
    for path in paths:
        identity = identify(path) if path else None
        if identity is not None:
            out[_read_key(Path(path).resolve(), run.resolve())] = identity
    return out


def _read_key(path: Path, run: Path) -> str:
    for base, prefix in ((run, ""), (PACKAGE_DIR, IN_PACKAGE)):
        if base in path.parents or path == base:
            return prefix + path.relative_to(base).as_posix()
    return str(path)


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
        path = check_run_dir(run)
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
