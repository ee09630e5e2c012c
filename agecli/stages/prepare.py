"""The prepare stage: dataset on disk -> aligned, labelled, split faces in RUN/prepare/.

    prepare("utkface", "../shared/data/utkface/UTKFace")            # -> runs/utkface/prepare/

Steps: parse the dataset (agecli.data.datasets) -> hash every image's bytes (duplicates share a
`content` key and a split) -> assign splits -> detect, choose and align faces chunk by chunk
-> consolidate into the face store (agecli.store): faces.npy, records.csv, rejects.csv,
missing.txt, manifest.json.

Resumable: the sample list is cut into fixed chunks; each finished chunk is written
atomically to RUN/prepare/.work/<key>/chunk_NNNNN.npz, where <key> hashes everything that
changes the output. A killed run loses at most the chunks in flight; re-running skips the
finished ones and produces byte-identical results. `shard="I/N"` (1-based) processes only
chunks I-1, I-1+N, ... so several jobs can share one run folder; a later run without
`shard` does what is left and consolidates.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agecli import FORMAT_VERSION
from agecli.data.datasets import DatasetSpec, Parsed, Sample, get_dataset
from agecli.device import require_device
from agecli.errors import AgecliError
from agecli.labels import GROUP_NAMES
from agecli.options import PrepareOptions
from agecli.progress import ProgressFn, log
from agecli.rundir import (Stage, atomic_path, check_run_dir, fingerprint_listing, read_json, runs_root, write_csv,
                           write_text)
from agecli.store import RECORD_COLUMNS, Alignment

# images per resumable chunk, by detector: detection is slow, resizing a crop is not
CHUNK_SIZES = {"mtcnn": 64, "none": 1024}

# Adience's faces/ crops are centred on the labelled face, which spans about half the crop
# (MTCNN boxes on the 19 sample crops: 200-320 px of ~600); used to pick the face and as
# the fallback when detection fails.
CROP_CENTRE_FRACTION = 0.5


# --------------------------------------------------------------------------- public API
def prepare(dataset: str, root: str | os.PathLike, run: str | os.PathLike | None = None, *,
            size: int = PrepareOptions.size, margin: float = PrepareOptions.margin,
            template: str = PrepareOptions.template, detector: str | None = PrepareOptions.detector,
            device: str = PrepareOptions.device, workers: int | None = PrepareOptions.workers,
            limit: int | None = PrepareOptions.limit, shard: str | None = PrepareOptions.shard,
            strict: bool = PrepareOptions.strict, seed: int = PrepareOptions.seed,
            val_fraction: float = PrepareOptions.val_fraction, test_fraction: float = PrepareOptions.test_fraction,
            max_side: int = PrepareOptions.max_side, min_score: float = PrepareOptions.min_score,
            progress: ProgressFn | None = None) -> dict[str, Any]:
    """Prepare `dataset` found at `root` into RUN/prepare/; returns the results dict.

    The keywords are the fields of `agecli.options.PrepareOptions` (their defaults and
    checks); `detector=None` is the dataset's default detector."""
    started = time.perf_counter()
    spec = get_dataset(dataset)
    options = PrepareOptions(size=size, margin=margin, template=template, detector=detector or spec.default_detector,
                             device=device, workers=workers, limit=limit, shard=shard, strict=strict, seed=seed,
                             val_fraction=val_fraction, test_fraction=test_fraction, max_side=max_side,
                             min_score=min_score)
    options.device = _check_machine(options)
    run = check_run_dir(run if run is not None else runs_root() / dataset)
    shard_index, shard_count = options.shard_slot()
    lock_key = f"shard{shard_index + 1}of{shard_count}" if shard is not None else None  # shards run side by side
    Stage(run, "prepare", lock_key=lock_key).check()  # refuse a second writer now, not after listing the dataset
    plan = _plan(dataset, Path(root), spec, options)
    if shard is None and (done := _already_prepared(run, plan.key)) is not None:
        return done
    _refuse_orphaning_models(run, plan.key)
    inputs = {"root": str(plan.root.resolve()), "listing": plan.listing, "samples": len(plan.samples)}
    args = dict(dataset=dataset, root=str(plan.root), **options.to_dict())
    with Stage(run, "prepare", args=args, inputs=inputs, lock_key=lock_key) as stage:
        stage.set(work_key=plan.key, dataset=dataset, alignment=plan.alignment.to_dict())
        work = _work_folder(stage.dir, plan.key, keep_others=shard is not None)
        contents, hash_rejects = _hash_files(plan.parsed.image_root, plan.samples)
        splits = assign_splits(plan.samples, contents, seed=seed, val_fraction=val_fraction,
                               test_fraction=test_fraction)
        jobs = _chunk_jobs(plan, work, contents, splits)
        reused, n_workers = _align_chunks(plan, jobs, progress)
        if shard is not None:
            results = dict(dataset=dataset, shard=shard, chunks=len(jobs), chunks_reused=reused,
                           images=sum(len(j[2]) for j in jobs), elapsed_s=round(time.perf_counter() - started, 2))
            stage.set(status="partial", results=results)
            return results
        frame, reject_frame = _consolidate(stage, plan, work, hash_rejects)
        if frame.empty:   # a finished stage of no faces would only fail the next command
            reasons = ", ".join(f"{reason} {count}" for reason, count in
                                sorted(Counter(reject_frame["reason"].tolist()).items())) or "none"
            raise AgecliError(f"no face was stored from {plan.root} (rejects: "
                              f"{reasons}; each with its path in {stage.path('rejects.csv')}). Fix those images "
                              "or paths (a CSV's paths are relative to its folder and stay inside it), or "
                              "choose another --detector, and run prepare again.")
        elapsed = time.perf_counter() - started
        results = _results(dataset, plan.root, run, plan.parsed, plan.samples, frame, reject_frame,
                           Counter(plan.parsed.quirks), _duplicate_report(plan.samples, contents),
                           elapsed, reused, _chunk_count(plan), n_workers)
        results["warnings"] = _split_warnings(results, val_fraction, test_fraction)
        shutil.rmtree(stage.dir / ".work", ignore_errors=True)
        stage.set(dataset=dataset, alignment=plan.alignment.to_dict(),
                  protocol=_protocol(spec, frame, seed, val_fraction, test_fraction),
                  label_space=_label_space(spec), detection=plan.settings)
        stage.complete(results)
        return results


def _split_warnings(results: dict[str, Any], val_fraction: float, test_fraction: float) -> list[str]:
    """An empty train or (labelled) val split, and what to change. Each subject, and each group
    of identical images, goes to one split, so a few people can all land in one."""
    splits = results["splits"]
    labelled = "labels" not in results or "age" in results["labels"]
    empty = [split for split in ("train", "val") if not splits.get(split) and (split == "train" or labelled)]
    if not empty:
        return []
    need = {"train": "train and distill learn from training faces",
            "val": "train and distill choose best.pt on validation faces"}
    return [f"no face is in the {' or '.join(empty)} split ({splits}): each subject, and each group of identical "
            f"images, goes to one split, and there are too few of them here. {'; '.join(need[s] for s in empty)}: "
            f"prepare again with another --val-fraction (now {val_fraction:g}; --test-fraction {test_fraction:g} "
            "where the dataset has no official test split), another --seed, or more images (one person's images "
            "alone can never be split)."]


@dataclass
class _Plan:
    """What prepare will do, decided before it touches the run folder."""

    root: Path
    options: PrepareOptions           # detector resolved
    parsed: Parsed
    samples: list[Sample]             # the dataset's samples, or the `limit` subset
    alignment: Alignment
    settings: dict[str, Any]          # everything that changes a face crop (the manifest's "detection")
    listing: str                      # fingerprint of the image files
    key: str                          # hash of all that changes the output: names RUN/prepare/.work/<key>/

    @property
    def chunk(self) -> int:
        return CHUNK_SIZES[self.options.detector]


def _check_machine(options: PrepareOptions) -> str:
    """What the options cannot check alone: the template's name, and a GPU for --device cuda.
    Returns the device to use (`auto` resolved)."""
    from agecli.data.faces import template_points

    template_points(options.template)  # unknown template -> error before any work, whatever the detector
    if options.detector != "mtcnn" and (options.template, options.margin) != (PrepareOptions.template,
                                                                              PrepareOptions.margin):
        log(f"note: --template and --margin shape detected faces; with --detector {options.detector} each image "
            "is taken as an aligned crop and resized whole, so they change nothing.")
    return require_device(options.device) if options.detector == "mtcnn" else "cpu"


def _refuse_orphaning_models(run: Path, key: str) -> None:
    """Re-preparing a run with other settings would replace the faces its models were trained and
    scored on; refuse while the run holds models (a new --run keeps both)."""
    previous = run / "prepare" / "manifest.json"
    if not previous.exists():
        return
    try:
        old = read_json(previous)
    except AgecliError:
        return
    if old.get("status") != "complete" or old.get("work_key") in (None, key):
        return
    models = sorted(str(p.parent.relative_to(run)) for kind in ("train", "distill")
                    for p in (run / kind).glob("*/manifest.json"))
    if models:
        shown = ", ".join(models[:4]) + (", ..." if len(models) > 4 else "")
        raise AgecliError(f"run {run} was prepared with other settings and holds models trained on those faces "
                          f"({shown}); re-preparing would replace the faces they describe. Prepare into a new "
                          "--run, or repeat the settings of the earlier prepare (see its manifest's args).")


def _plan(dataset: str, root: Path, spec: DatasetSpec, options: PrepareOptions) -> _Plan:
    """Parse the dataset, pick the samples and fix the alignment and the work key."""
    parsed = spec.parse(root, strict=options.strict)
    samples = _subset(parsed.samples, options.limit, options.seed) if options.limit else parsed.samples
    alignment = (Alignment(method="similarity", size=options.size, margin=options.margin, template=options.template)
                 if options.detector == "mtcnn" else
                 Alignment(method="resize", size=options.size, margin=0.0, template=spec.native_template))
    settings = dict(dataset=dataset, alignment=alignment.to_dict(), detector=options.detector,
                    max_side=options.max_side, min_score=options.min_score, min_face_fraction=spec.min_face_fraction,
                    pad_fraction=spec.pad_fraction, all_faces=spec.all_faces, crop_centred=spec.crop_centred,
                    format=FORMAT_VERSION)
    listing = fingerprint_listing(parsed.image_root, [parsed.image_root / s.path for s in samples])
    key = hashlib.sha256(json.dumps([settings, listing, options.seed, options.val_fraction, options.test_fraction],
                                    sort_keys=True).encode()).hexdigest()[:16]
    return _Plan(root, options, parsed, samples, alignment, settings, listing, key)


def _subset(samples: list, limit: int, seed: int) -> list:
    """`limit` samples drawn at random (seeded), kept in listing order. The first N would
    not do: UTKFace names start with the age, so in sorted order they are a few ages only
    (100-116, then 10-19, then 1)."""
    if limit >= len(samples):
        return list(samples)
    keep = np.sort(np.random.default_rng(seed).choice(len(samples), size=limit, replace=False))
    return [samples[i] for i in keep]


def _already_prepared(run: Path, key: str) -> dict[str, Any] | None:
    """The results of a complete earlier prepare with the same work key, else None."""
    previous = run / "prepare" / "manifest.json"
    if not previous.exists():
        return None
    old = read_json(previous)
    if old.get("status") != "complete" or old.get("work_key") != key:
        return None
    results = dict(old.get("results", {}))
    results["reused"] = True
    return results


def _work_folder(stage_dir: Path, key: str, *, keep_others: bool) -> Path:
    """RUN/prepare/.work/<key>/, removing the chunks made with other settings (unless a
    shard runs: the other jobs' settings are not this one's to judge)."""
    work = stage_dir / ".work" / key
    work.mkdir(parents=True, exist_ok=True)
    for stale in (stage_dir / ".work").iterdir():
        if stale.name != key and not keep_others:
            shutil.rmtree(stale, ignore_errors=True)
    return work


# --------------------------------------------------------------------------- chunks
def _chunk_path(work: Path, k: int) -> Path:
    return work / f"chunk_{k:05d}.npz"


def _chunk_count(plan: _Plan) -> int:
    return math.ceil(len(plan.samples) / plan.chunk) if plan.samples else 0


def _chunk_jobs(plan: _Plan, work: Path, contents: dict[str, str], splits: list[str]) -> list[tuple]:
    """(index, path, items) for each chunk this run (or shard) handles."""
    shard_index, shard_count = plan.options.shard_slot()
    chunk, samples = plan.chunk, plan.samples
    jobs = []
    for k, start in enumerate(range(0, len(samples), chunk)):
        if shard_count and k % shard_count != shard_index:
            continue
        items = [(asdict(s), contents.get(s.path, ""), splits[i])
                 for i, s in enumerate(samples[start:start + chunk], start=start)]
        jobs.append((k, _chunk_path(work, k), items))
    return jobs


def _align_chunks(plan: _Plan, jobs: list[tuple], progress: ProgressFn | None) -> tuple[int, int]:
    """Detect and align the chunks not yet on disk; returns (chunks reused, worker processes)."""
    todo = [j for j in jobs if not j[1].exists()]
    options = plan.options
    config = dict(plan.settings, device=options.device, root=str(plan.parsed.image_root), threads=1)
    total_images = sum(len(j[2]) for j in jobs)
    done_images = sum(len(j[2]) for j in jobs if j[1].exists())
    if progress:
        progress("prepare", done_images, total_images)
    n_workers = _workers(options.workers, options.detector, options.device, len(todo))
    for k, count in _run_chunks(todo, config, n_workers):
        done_images += count
        if progress:
            progress("prepare", done_images, total_images)
    return len(jobs) - len(todo), n_workers


def _consolidate(stage: Stage, plan: _Plan, work: Path, hash_rejects: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every chunk into the face store: faces.npy, records.csv, rejects.csv, missing.txt."""
    paths = [_chunk_path(work, k) for k in range(_chunk_count(plan))]
    absent = [p.name for p in paths if not p.exists()]
    if absent:  # cannot happen without --shard; guard against a deleted .work
        raise AgecliError(f"{work}: chunks {absent[:3]} are missing; re-run prepare without --shard.")
    records, rejects = [], [asdict(r) for r in plan.parsed.rejects] + hash_rejects
    counts = []
    for path in paths:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
        records.extend(meta["records"])
        rejects.extend(meta["rejects"])
        counts.append(len(meta["records"]))
    _write_faces(stage.path("faces.npy"), paths, counts, plan.alignment.size)
    frame = pd.DataFrame(records, columns=RECORD_COLUMNS)
    write_csv(stage.path("records.csv"), frame)
    reject_frame = pd.DataFrame(rejects, columns=["path", "reason", "detail"])
    write_csv(stage.path("rejects.csv"), reject_frame)
    write_text(stage.path("missing.txt"), "".join(f"{m}\n" for m in plan.parsed.missing))
    return frame, reject_frame


def _write_faces(faces_path: Path, paths: list[Path], counts: list[int], size: int) -> None:
    """The chunks' crops, in chunk order, into one memory-mapped .npy written atomically."""
    with atomic_path(faces_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(sum(counts), size, size, 3))
        offset = 0
        for path, n in zip(paths, counts):
            if n:
                with np.load(path) as data:
                    out[offset:offset + n] = data["faces"]
            offset += n
        out.flush()
        del out


# --------------------------------------------------------------------------- splits
def _unit(seed: int, key: str) -> float:
    return int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:13], 16) / 16 ** 13


def assign_splits(samples: list[Sample], contents: dict[str, str], *, seed: int, val_fraction: float,
                  test_fraction: float) -> list[str]:
    """train/val/test per sample, deterministic given the seed.

    Official splits are kept (a val share is carved, by group, from train if the dataset has
    none). Otherwise whole groups go to one split, a group being the samples connected by a
    shared subject or shared file content (so duplicates and people never straddle splits).
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    keys = []
    for s in samples:
        content = contents.get(s.path, "")
        ids = [f"c:{content}" if content else f"p:{s.path}"] + ([f"s:{s.subject}"] if s.subject else [])
        for other in ids[1:]:
            a, b = find(ids[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
        keys.append(ids[0])
    has_official = any(s.split for s in samples)
    has_val = any(s.split == "val" for s in samples)
    out = []
    for s, key in zip(samples, keys):
        u = _unit(seed, find(key))
        if has_official:
            split = s.split or "train"
            if split == "train" and not has_val and u < val_fraction:
                split = "val"
        else:
            split = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
        out.append(split)
    return out


# --------------------------------------------------------------------------- hashing
def _hash_files(image_root: Path, samples: list[Sample]) -> tuple[dict[str, str], list[dict]]:
    """sha1 of each sample's bytes; files that cannot be read (a named pipe, a device, one over
    the size limit, a permission error) become rejects instead."""
    from agecli.data.faces import ImageError, read_file_bytes

    contents, rejects = {}, []
    for s in samples:
        if s.path in contents:
            continue
        try:
            contents[s.path] = hashlib.sha1(read_file_bytes(image_root / s.path)).hexdigest()
        except ImageError as exc:
            rejects.append(dict(path=s.path, reason=exc.reason, detail=exc.detail))
    return contents, rejects


def _duplicate_report(samples: list[Sample], contents: dict[str, str]) -> dict[str, int]:
    by_content: dict[str, list[Sample]] = {}
    for s in samples:
        if s.path in contents:
            by_content.setdefault(contents[s.path], []).append(s)
    groups = [g for g in by_content.values() if len(g) > 1]
    conflicting = sum(1 for g in groups if len({(s.age, s.gender) for s in g}) > 1)
    return dict(groups=len(groups), files=sum(len(g) for g in groups), conflicting_labels=conflicting)


# --------------------------------------------------------------------------- workers
def _workers(workers: int | None, detector: str, device: str, n_jobs: int) -> int:
    if workers is not None:
        return max(0, workers)
    if detector == "none" or device.startswith("cuda") or n_jobs < 2:
        return 0  # in-process: decoding crops is cheap; a GPU batches better from one process
    return min(os.cpu_count() or 1, n_jobs, 8)


def _run_chunks(todo, config, n_workers):
    if not todo:
        return
    if n_workers <= 1:
        import torch

        threads = torch.get_num_threads() if config["detector"] == "mtcnn" else 1
        worker = _ChunkWorker(dict(config, threads=threads))
        for k, path, items in todo:
            yield k, worker.run(path, items)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(n_workers, initializer=_init_worker, initargs=(config,)) as pool:
        for k, count in pool.imap_unordered(_pool_job, todo):
            yield k, count


_WORKER: "_ChunkWorker | None" = None


def _init_worker(config: dict) -> None:
    global _WORKER
    _WORKER = _ChunkWorker(config)


def _pool_job(job) -> tuple[int, int]:
    k, path, items = job
    return k, _WORKER.run(path, items)


class _ChunkWorker:
    """Decode, detect, choose and align one chunk; write it atomically as an .npz."""

    def __init__(self, config: dict):
        from agecli.data import faces

        self.faces = faces
        self.config = config
        self.root = Path(config["root"])
        self.alignment = Alignment.from_dict(config["alignment"])
        self.detector = None
        if config["detector"] == "mtcnn":
            import torch

            torch.set_num_threads(max(1, int(config.get("threads", 1))))
            self.detector = faces.Detector(device=config["device"], max_side=config["max_side"],
                                           min_face_fraction=config["min_face_fraction"],
                                           min_score=config["min_score"], pad_fraction=config["pad_fraction"],
                                           batch_size=64 if config["device"].startswith("cuda") else 16)

    def run(self, path: Path, items: list) -> int:
        """Align the faces of `items` ((sample dict, content hash, split) each) into `path`."""
        records: list[dict] = []
        rejects: list[dict] = []
        crops: list[np.ndarray] = []
        loaded = self._decode(items, rejects)
        if self.detector is None:
            for sample, content, split, image in loaded:
                crops.append(self.faces.resize_crop(image, self.alignment.size))
                records.append(_record(sample, content, split, "none", None, "only"))
        else:
            found = self.detector.detect([item[3] for item in loaded], retry=not self.config["all_faces"])
            for (sample, content, split, image), dets in zip(loaded, found):
                self._align_detected(sample, content, split, image, dets, crops, records, rejects)
        self._save(path, crops, records, rejects)
        return len(items)

    def _decode(self, items: list, rejects: list[dict]) -> list[tuple]:
        """(sample, content, split, image) for each readable item; the others become rejects."""
        loaded = []
        for sample, content, split in items:
            if not content:
                continue  # unreadable: already rejected while hashing
            try:
                image = self.faces.read_image(self.root / sample["path"])
            except self.faces.ImageError as exc:
                rejects.append(dict(path=sample["path"], reason=exc.reason, detail=exc.detail))
                continue
            loaded.append((sample, content, split, image))
        return loaded

    def _align_detected(self, sample: dict, content: str, split: str, image: np.ndarray, dets: list,
                        crops: list, records: list, rejects: list) -> None:
        """The chosen face(s) of one image, a centred fallback, or a no_face reject."""
        faces_mod = self.faces
        if not dets and self.config["crop_centred"]:
            # the crop is centred on the labelled face (Adience): align the centre
            marks = faces_mod.centre_landmarks(image.shape, CROP_CENTRE_FRACTION, self.alignment.template)
            crops.append(faces_mod.align(image, marks, self.alignment))
            records.append(_record(sample, content, split, "none", None, "crop_centre_fallback"))
            return
        if not dets:
            rejects.append(dict(path=sample["path"], reason="no_face", detail=""))
            return
        for index, how in self._choose(sample, image, dets):
            det = dets[index]
            crops.append(faces_mod.align(image, det.landmarks, self.alignment))
            records.append(_record(sample, content, split, "mtcnn", det, how))

    def _choose(self, sample: dict, image: np.ndarray, dets: list) -> list[tuple[int, str]]:
        """(detection index, how it was chosen) of the face(s) to keep: every face, or the one
        `faces.pick_face` picks, hinted by the metadata box (else, on a centred crop, its centre)."""
        if self.config["all_faces"]:
            return [(i, "all") for i in range(len(dets))]
        hint, name = sample["box"], "metadata_box"
        if hint is None and self.config["crop_centred"]:
            h, w = image.shape[:2]
            side = CROP_CENTRE_FRACTION * min(h, w)
            hint, name = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2), "crop_centre"
        index, how = self.faces.pick_face(dets, image.shape, hint)
        return [(index, name if how == "metadata_box" else how)]

    def _save(self, path: Path, crops: list, records: list, rejects: list) -> None:
        size = self.alignment.size
        array = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
        meta = json.dumps(dict(records=records, rejects=rejects))
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, faces=array, meta=np.array(meta))


def _record(sample: dict, content: str, split: str, detector: str, det, chosen_by: str) -> dict:
    return dict(path=sample["path"], age=sample["age"], age_std=sample["age_std"], gender=sample["gender"],
                race=sample["race"], group=sample["group"], fold=sample["fold"], subject=sample["subject"],
                split=split, content=content, detector=detector,
                score=round(det.score, 5) if det is not None else math.nan,
                box=" ".join(f"{v:.1f}" for v in det.box) if det is not None else "",
                landmarks=" ".join(f"{v:.1f}" for v in det.landmarks.reshape(-1)) if det is not None else "",
                chosen_by=chosen_by)


# --------------------------------------------------------------------------- reporting
def _results(dataset, root, run, parsed: Parsed, samples, frame: pd.DataFrame, rejects: pd.DataFrame,
             quirks, duplicates, elapsed, reused, n_chunks, n_workers) -> dict[str, Any]:
    ages = frame["age"].astype(float).dropna()
    labels: dict[str, Any] = {}
    if len(ages):
        labels["age"] = dict(mean=round(float(ages.mean()), 2), min=float(ages.min()), max=float(ages.max()))
    labels["gender"] = {name: int((frame["gender"] == code).sum())
                        for code, name in ((0, "male"), (1, "female"), (-1, "unknown"))}
    groups = frame["group"][frame["group"] >= 0]
    if len(groups):
        labels["group"] = {GROUP_NAMES[g]: int(c) for g, c in sorted(Counter(groups.tolist()).items())}
    faces = len(frame)
    return dict(
        dataset=dataset, root=str(root), run=str(run),
        rows=parsed.rows, samples=len(samples), images_seen=len(samples),
        faces_stored=faces, images_with_faces=int(frame["path"].nunique()) if faces else 0,
        rejects={k: int(v) for k, v in sorted(Counter(rejects["reason"].tolist()).items())},
        quirks={k: int(v) for k, v in sorted(quirks.items())},
        missing=len(parsed.missing), duplicates=duplicates,
        splits={k: int(v) for k, v in sorted(Counter(frame["split"].tolist()).items())},
        chosen_by={k: int(v) for k, v in sorted(Counter(frame["chosen_by"].tolist()).items())},
        labels=labels, chunks=n_chunks, chunks_reused=reused, workers=n_workers,
        elapsed_s=round(elapsed, 2), faces_per_s=round(faces / elapsed, 1) if elapsed > 0 else None,
        reused=False,
    )


def _protocol(spec, frame: pd.DataFrame, seed, val_fraction, test_fraction) -> dict[str, Any]:
    folds = sorted(int(f) for f in set(frame["fold"].tolist()) if f != -1)
    return dict(kind=spec.protocol, folds=folds if spec.protocol in ("folds", "loso") else [],
                split_groups="subject and content" if spec.protocol in ("folds", "loso") else "content",
                seed=seed, val_fraction=val_fraction,
                test_fraction=None if spec.protocol == "official" else test_fraction)


def _label_space(spec) -> dict[str, Any]:
    return dict(kind=spec.label_space, age={"group": "group_midpoint", "age": "years",
                                            "apparent_age": "mean_of_votes", "none": None}[spec.label_space],
                groups=list(GROUP_NAMES), gender="0 male, 1 female, -1 unknown")
