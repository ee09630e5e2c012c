"""Feeding the teacher's answers to the loss, three ways:

    TeacherTable  outputs on un-augmented faces, computed once and cached on disk (--no-augment)
    TeacherViews  outputs on K fixed augmented crops per face, computed once (--teacher-views K);
                  its `make_input` has fit augment each face as one of those crops
    LiveTeacher   the teacher run on the student's own augmented batch; `CropForTeacher` has fit
                  cut that crop at a larger teacher's resolution

A feed is called as `feed(batch, x) -> TeacherOutput` (x: the student's input, for its device).
`MirrorPairs` wraps any of fit's input functions so that every step also trains on the mirror
image of each crop (options.mirror_pairs; the loss's "mirror" term pairs the two halves).

Under options.robust_augment the student's input is also degraded (noise, blur, JPEG; see
`agecli.data.batches.degrade`) but no teacher ever sees that: the table and the bank hold
answers on clean crops, and `CropForTeacher` hands a live teacher the clean crop as `batch.view`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from agecli.data.batches import Augment, Batch, draw_augment, resize, to_unit
from agecli.engine.loop import InputFn, Preprocess, finish_input, plain_input
from agecli.errors import AgecliError
from agecli.progress import ProgressFn
from agecli.rundir import atomic_path
from agecli.stages.distill.stores import store_key
from agecli.stages.teachers import Teacher, TeacherOutput, predict_teacher


class RowPositions:
    """Where each store row sits in a cache that holds the sorted `indices` rows."""

    def __init__(self, n_rows: int, indices: np.ndarray):
        self.position = np.full(n_rows, -1, dtype=np.int64)
        self.position[indices] = np.arange(len(indices))

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        pos = torch.from_numpy(self.position[rows.cpu().numpy()])
        if (pos < 0).any():
            raise RuntimeError("the teacher cache was asked for rows it does not hold")
        return pos


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(array))


def _cache_key(*parts, indices: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(list(parts)).encode())
    digest.update(indices.tobytes())
    return digest.hexdigest()[:20]


class TeacherTable:
    """Teacher outputs for store rows, computed once and cached on disk (npy, atomic)."""

    def __init__(self, teacher: Teacher, store, indices, cache_dir: Path, *, batch_size: int = 256,
                 device: str = "cpu", progress: ProgressFn | None = None):
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        self.key = _cache_key(teacher.cache_key(), store_key(store), indices=indices)
        self.dir = Path(cache_dir)
        files = {k: self.dir / f"{self.key}.{k}.npy" for k in ("index", "age", "probs", "features")}
        self.hit = files["index"].exists() and files["age"].exists() and files["probs"].exists()
        if self.hit:
            data = {k: np.load(p) for k, p in files.items() if p.exists()}
            if not np.array_equal(data["index"], indices):
                self.hit = False
        if not self.hit:
            data = predict_teacher(teacher, store, indices, batch_size=batch_size, device=device, progress=progress)
            data["index"] = indices
            for k, arr in data.items():  # the index file last: its presence means the rest is complete
                if k != "index":
                    _save_npy(files[k], arr)
            _save_npy(files["index"], indices)
        self.positions = RowPositions(len(store.records), indices)
        self.age = torch.from_numpy(np.asarray(data["age"], dtype=np.float32))
        self.probs = torch.from_numpy(np.asarray(data["probs"], dtype=np.float32))
        feats = data.get("features")
        self.features = None if feats is None else torch.from_numpy(np.asarray(feats, dtype=np.float32))

    def lookup(self, rows: torch.Tensor) -> TeacherOutput:
        pos = self.positions(rows)
        return TeacherOutput(self.age[pos], self.probs[pos], None if self.features is None else self.features[pos])

    def __call__(self, batch, x: torch.Tensor) -> TeacherOutput:
        return self.lookup(batch.index).to(x.device)


class TeacherViews:
    """A bank of `views` fixed augmented crops of every training face with the teacher's outputs
    on each, computed once (FKD, Shen & Xing 2022). Training augments each face as one of its
    crops, drawn at random every time, so the student still sees `views` different crops per face
    and the teacher's answer matches the very crop it sees, yet a slow teacher runs `views` times
    per face in all instead of once per face and epoch: past `views` epochs the bank is cheaper,
    and every further epoch or seed costs only the student (on the 2-core CPU, ~85 s instead of
    ~5 min per UTKFace epoch with the 128 px teacher).

    The crops are `data.batches.draw_augment` numbers from a seeded generator, stored with the
    outputs. The bank belongs to the teacher and the faces, not to one student: students with
    other seeds pick other views in another order from the same bank.
    Each view is its own set of files (atomic, its `age` file written last), so an interrupted
    build goes on from the views it finished."""

    def __init__(self, teacher: Teacher, store, indices, views: int, cache_dir: Path, *, view_size: int,
                 augment: Augment | None = None, seed: int = 0, batch_size: int = 256, device: str = "cpu",
                 progress: ProgressFn | None = None):
        if views < 1:
            raise AgecliError(f"--teacher-views must be at least 1 (got {views}); 0 runs the teacher live.")
        augment = augment or Augment()
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        self.key = _cache_key(teacher.cache_key(), store_key(store), view_size, seed, asdict(augment), indices=indices)
        self.dir = Path(cache_dir)
        generator = torch.Generator().manual_seed(seed)
        # view k's numbers do not depend on how many views there are: a larger bank reuses a smaller one
        self.params = torch.stack([draw_augment(len(indices), augment, generator) for _ in range(views)])
        ages, probs, self.built = [], [], 0
        started = time.perf_counter()
        for k in range(views):
            age, prob, built = self._view(k, teacher, store, indices, view_size, batch_size, device, progress)
            ages.append(age)
            probs.append(prob)
            self.built += built
        self.views, self.seconds = views, time.perf_counter() - started
        self.age = torch.from_numpy(np.stack(ages))        # (views, faces)
        self.probs = torch.from_numpy(np.stack(probs))     # (views, faces, ages)
        self.positions = RowPositions(len(store.records), indices)

    def _view(self, k: int, teacher: Teacher, store, indices: np.ndarray, view_size: int, batch_size: int,
              device: str, progress: ProgressFn | None) -> tuple[np.ndarray, np.ndarray, bool]:
        """View k's teacher ages and probabilities, labelled now unless stored for these very crops."""
        files = {name: self.dir / f"{self.key}.view{k}.{name}.npy" for name in ("params", "probs", "age")}
        # the stored numbers must be the ones drawn now (another torch could draw others for the seed)
        labelled = files["age"].exists() and np.array_equal(np.load(files["params"]), self.params[k].numpy())
        if not labelled:
            def report(label: str, done: int, total: int) -> None:
                if progress:
                    progress(f"teacher view {k + 1}/{len(self.params)}", done, total)

            data = predict_teacher(teacher, store, indices, batch_size=batch_size, device=device,
                                   progress=report, augment_params=self.params[k], view_size=view_size)
            _save_npy(files["params"], self.params[k].numpy())
            _save_npy(files["probs"], data["probs"].astype(np.float32))
            _save_npy(files["age"], data["age"].astype(np.float32))  # last: the view is complete
        return np.load(files["age"]), np.load(files["probs"]), not labelled

    def draw(self, rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One stored view per row, at random: (view ids, their augmentation numbers)."""
        view_id = torch.randint(self.views, (len(rows),), generator=generator)
        return view_id, self.params[view_id, self.positions(rows)]

    def make_input(self, batch: Batch, generator: torch.Generator, prep: Preprocess) -> tuple[Batch, torch.Tensor]:
        """fit's input function: each face augmented as one of its stored crops (`batch.view_id`),
        then degraded if asked (the bank's answers stay those on the clean crop)."""
        if prep.augment is None:
            return plain_input(batch, generator, prep)
        view_id, params = self.draw(batch.index, generator)
        x01 = to_unit(batch.images, prep.size, device=prep.device, params=params)
        return finish_input(replace(batch, view_id=view_id), x01, generator, prep)

    def __call__(self, batch, x: torch.Tensor) -> TeacherOutput:
        if batch.view_id is None:
            raise RuntimeError("a teacher view bank needs batches augmented by it (fit's make_input=views.make_input)")
        pos, view_id = self.positions(batch.index), batch.view_id.cpu()
        return TeacherOutput(self.age[view_id, pos], self.probs[view_id, pos], None).to(x.device)


class LiveTeacher:
    """Runs the teacher on the student's own augmented batch: the crop at the teacher's
    resolution when fit made one (`batch.view`, see `CropForTeacher`), else the student's
    input un-normalised back to [0, 1]. A degraded student input (`batch.degraded`) never
    reaches the teacher: without the clean view it is an error."""

    def __init__(self, teacher: Teacher, mean: Sequence[float], std: Sequence[float]):
        self.teacher, self.mean, self.std = teacher, tuple(mean), tuple(std)

    def __call__(self, batch, x: torch.Tensor) -> TeacherOutput:
        if getattr(batch, "view", None) is not None:
            return self.teacher(batch.view).to(x.device)
        if getattr(batch, "degraded", None) is not None:
            raise RuntimeError("a live teacher got a degraded student input without its clean crop "
                               "(fit's make_input must be CropForTeacher under robust_augment)")
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x01 = (x.detach().float() * std + mean).clamp_(0, 1)
        return self.teacher(x01).to(x.device)


class CropForTeacher:
    """fit's input function with a live teacher: when it takes a larger input than the student, or
    the student's input is degraded (`Preprocess.robust`), each face is augmented at the larger of
    `view_size` and the student's size, that clean [0, 1] crop goes to the teacher as
    `batch.view` (the very augmentation the student sees, at the teacher's resolution) and the
    student gets it downsized, then degraded if asked."""

    def __init__(self, view_size: int):
        self.view_size = view_size

    def __call__(self, batch: Batch, generator: torch.Generator, prep: Preprocess) -> tuple[Batch, torch.Tensor]:
        if not prep.robust and (prep.augment is None or self.view_size <= prep.size):
            return plain_input(batch, generator, prep)
        view = to_unit(batch.images, max(self.view_size, prep.size), device=prep.device, augment=prep.augment,
                       generator=generator)
        return finish_input(replace(batch, view=view), resize(view, prep.size), generator, prep)


class MirrorPairs:
    """fit's input function around another (`inner`): the batch's B inputs followed by their
    mirror images, 2B in all, every per-face field of the batch repeated to match. Row i + B is
    row i mirrored, which the "mirror" loss term relies on. A live teacher's clean crop
    (`batch.view`) is mirrored with it; stored teacher answers (a bank, a table) are looked up
    by face and view, so the mirror image gets the crop's answer: exact only for a teacher
    that answers both sides alike (--teacher-mirror), which the stage requires."""

    def __init__(self, inner: InputFn | None = None):
        self.inner = inner or plain_input

    def __call__(self, batch: Batch, generator: torch.Generator, prep: Preprocess) -> tuple[Batch, torch.Tensor]:
        batch, x = self.inner(batch, generator, prep)
        doubled = {}
        for f in fields(batch):
            value = getattr(batch, f.name)
            if f.name == "view" and value is not None:
                doubled[f.name] = torch.cat([value, value.flip(-1)])
            elif f.name != "images" and isinstance(value, torch.Tensor):
                doubled[f.name] = torch.cat([value, value])
        pair = torch.cat([x, x.flip(-1)])
        if prep.channels_last:
            pair = pair.contiguous(memory_format=torch.channels_last)
        return replace(batch, **doubled), pair


def teacher_on(teacher: Teacher, store, indices, device: str, progress: ProgressFn | None) -> TeacherOutput:
    """The teacher's outputs on un-augmented store rows (scoring it next to the student)."""
    data = predict_teacher(teacher, store, indices, device=device, progress=progress)
    return TeacherOutput(torch.from_numpy(data["age"]), torch.from_numpy(data["probs"]))
