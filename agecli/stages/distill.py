"""Knowledge distillation: a small student learns from one or more teachers (`agecli distill`).

    distill(run, teachers=["dlib-age"], student="mobilenet", methods=["soft"])

The student is trained by the shared loop (`agecli.train.fit`); distillation only supplies
its loss, a weighted sum of named terms built from a registry (torchdistill-style), e.g.

    soft:    L = 0.5 * gt + 1 * soft                     (Hinton et al. 2015)
    pseudo:  L = 0.5 * gt + 1 * pseudo                   (Greco et al. 2021)
    hint:    L = 0.5 * gt + 1 * hint                     (FitNets, Romero et al. 2015)
    ordinal: L = 0.5 * gt + 1 * soft + 1 * ordinal       (Zhao et al. 2021)

Terms (each prints its own formula, `DistillLoss.formula()`):

    gt       the student encoding's own loss on faces with a known age (+ gender CE with --gender)
    soft     T^2 KL(p_t^T || p_s^T) over ages 0..100; for a regression student, the encoding's
             L1/L2 to the teacher's expected age
    pseudo   KL(p_t || p_s) on faces without a label: the teacher labels an unlabelled face set
             (`--unlabelled RUN`, its labels ignored) that is trained on together with the labelled one
    hint     ||W f_s - f_t||^2 / var(f_t): student features through a learned linear adapter W
             regress the teacher's pooled features (or a named teacher layer)
    ordinal  relation + rank: a ranking teacher (trained here to put shuffled sequences of k
             faces back in age order, ListMLE) gives features whose pairwise distances the
             student's features must reproduce (RKD distance), and scores whose pairwise order
             the student's predicted ages must follow; `soft` then adds the dark knowledge of
             the classification teacher(s) given with --teacher

Teacher outputs are cached in RUN/teacher_cache/ (keyed by teacher, faces and crops, so that
every student of a run shares them) when the student's inputs do
not change between epochs (--no-augment); with augmentation the teachers see the very batch
the student sees, un-normalised and re-prepared their own way (see agecli.teachers), or, with
--teacher-views K, label K fixed augmented crops per face once (`TeacherViews`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from agecli.errors import AgecliError
from agecli.progress import ProgressFn
from agecli.rundir import Stage, atomic_path, resolve_run, unique_name, write_csv, write_json
from agecli.store import FaceStore
from agecli.stages.train import TrainOptions
from agecli.stages.teachers import Teacher, TeacherOutput, build_teacher, load_teacher, predict_teacher, soften

METHODS = ("soft", "pseudo", "hint", "ordinal")


# =========================================================================== loss terms
@dataclass
class Context:
    """What a loss term may look at for one training step."""

    outputs: dict[str, torch.Tensor]   # the student's forward (plus "hint_source" when hooked)
    batch: Any                         # agecli.data.Batch, labels on the student's device
    x: torch.Tensor                    # the student's normalised (augmented) input
    encoding: Any                      # the student's encoding
    teacher: Callable[[], TeacherOutput]   # lazy, computed once per step
    rank: Callable[[], TeacherOutput]      # lazy ranking-teacher output (ordinal)

    @property
    def labelled(self) -> torch.Tensor:
        return ~torch.isnan(self.batch.age)


class Term(nn.Module):
    """One named loss term; subclasses implement `forward(ctx) -> scalar` and `formula`."""

    name = ""
    formula = ""
    needs = ()  # "teacher", "features", "rank"

    def extra_repr(self) -> str:
        return self.formula


LOSSES: dict[str, type[Term]] = {}


def register_loss(cls: type[Term]) -> type[Term]:
    if cls.name in LOSSES:
        raise ValueError(f"loss {cls.name!r} registered twice")
    LOSSES[cls.name] = cls
    return cls


def _zero(ctx: Context) -> torch.Tensor:
    return ctx.outputs["age"].sum() * 0.0  # keeps the graph connected (DDP)


@register_loss
class GroundTruth(Term):
    name = "gt"
    formula = "encoding loss(student, true age) on labelled faces"

    def __init__(self, gender: bool = False):
        super().__init__()
        self.gender = gender

    def forward(self, ctx: Context) -> torch.Tensor:
        known = ctx.labelled
        loss = (ctx.encoding.loss(ctx.outputs["age"][known], ctx.batch.age[known], ctx.batch.age_std[known])
                if known.any() else _zero(ctx))
        if self.gender and "gender" in ctx.outputs and (ctx.batch.gender >= 0).any():
            loss = loss + F.cross_entropy(ctx.outputs["gender"].float(), ctx.batch.gender, ignore_index=-1)
        return loss


def _kl(teacher_probs: torch.Tensor, student_log: torch.Tensor) -> torch.Tensor:
    """KL(p_t || p_s) per row."""
    p = teacher_probs.float().clamp_min(0)
    return (p * (torch.log(p.clamp_min(1e-12)) - student_log)).sum(1)


@register_loss
class SoftTarget(Term):
    name = "soft"
    needs = ("teacher",)

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        if not temperature > 0:
            raise AgecliError(f"--temperature must be > 0 (got {temperature}).")
        self.temperature = float(temperature)
        self.formula = f"T^2 KL(p_t^T || p_s^T), T={self.temperature:g}  (regression student: L1 to teacher age)"

    def forward(self, ctx: Context) -> torch.Tensor:
        t = ctx.teacher()
        log_s = ctx.encoding.log_distribution(ctx.outputs["age"], self.temperature)
        if log_s is None:  # regression student: the teacher's expected age is the target
            return ctx.encoding.loss(ctx.outputs["age"], t.age)
        target = soften(t.probs, self.temperature)
        return _kl(target, log_s).mean() * self.temperature ** 2


@register_loss
class PseudoLabel(Term):
    name = "pseudo"
    needs = ("teacher",)

    def __init__(self, hard: bool = False, all_faces: bool = False):
        super().__init__()
        self.hard, self.all_faces = hard, all_faces
        target = "encoding loss(student, teacher age)" if hard else "KL(p_t || p_s)"
        self.formula = f"{target} on {'all' if all_faces else 'unlabelled'} faces"

    def forward(self, ctx: Context) -> torch.Tensor:
        rows = torch.ones_like(ctx.labelled) if self.all_faces else ~ctx.labelled
        if not rows.any():
            return _zero(ctx)
        t = ctx.teacher()
        out = ctx.outputs["age"][rows]
        log_s = ctx.encoding.log_distribution(out, 1.0)
        if self.hard or log_s is None:
            return ctx.encoding.loss(out, t.age[rows])
        return _kl(t.probs[rows], log_s).mean()


@register_loss
class Hint(Term):
    name = "hint"
    needs = ("teacher", "features")

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.adapter = nn.Linear(student_dim, teacher_dim)
        self.formula = f"||W f_s - f_t||^2 / var(f_t), W: {student_dim}->{teacher_dim} learned"

    def forward(self, ctx: Context) -> torch.Tensor:
        f_t = ctx.teacher().features
        if f_t is None:
            raise AgecliError("the hint method needs teacher features, but the teacher gave none.")
        f_s = ctx.outputs.get("hint_source", ctx.outputs["features"]).float()
        f_t = f_t.float()
        return F.mse_loss(self.adapter(f_s), f_t) / f_t.var().clamp_min(1e-6)


def _pdist(f: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(f.float(), f.float())
    off = ~torch.eye(len(f), dtype=torch.bool, device=f.device)
    return d / d[off].mean().clamp_min(1e-6)


@register_loss
class OrdinalRelation(Term):
    name = "ordinal"
    needs = ("rank",)

    def __init__(self, relation: float = 1.0, rank: float = 1.0, scale: float = 5.0):
        super().__init__()
        self.relation, self.rank, self.scale = relation, rank, scale
        self.formula = (f"{relation:g} RKD-distance(f_s, f_rank) + {rank:g} mean max(0, -sign(r_i - r_j) "
                        f"(age_s,i - age_s,j) / {scale:g}) over pairs")

    def forward(self, ctx: Context) -> torch.Tensor:
        r = ctx.rank()
        loss = _zero(ctx)
        if len(r.age) < 2:
            return loss
        if self.relation and r.features is not None:
            f_s = ctx.outputs.get("hint_source", ctx.outputs["features"])
            loss = loss + self.relation * F.smooth_l1_loss(_pdist(f_s), _pdist(r.features))
        if self.rank:
            ages = ctx.encoding.predict(ctx.outputs["age"])
            diff_t = r.age[:, None] - r.age[None, :]
            pairs = diff_t.abs() > 1e-3
            if pairs.any():
                # a hinge at zero: only pairs the student orders against the ranker cost anything.
                # (A logistic loss keeps pushing well-ordered pairs apart, stretching every
                # prediction away from the middle: val MAE rose from 7.5 to 9.1 in 6 epochs.)
                diff_s = (ages[:, None] - ages[None, :]) / self.scale
                loss = loss + self.rank * F.relu(-torch.sign(diff_t[pairs]) * diff_s[pairs]).mean()
        return loss


class DistillLoss(nn.Module):
    """Weighted sum of named terms; the `loss_fn` of `agecli.train.fit`."""

    def __init__(self, terms: Sequence[tuple[str, float, Term]]):
        super().__init__()
        self.names = [n for n, _, _ in terms]
        self.weights = {n: float(w) for n, w, _ in terms}
        self.terms = nn.ModuleDict({n: t for n, _, t in terms})
        self.encoding = None
        self.teacher_feed: Callable | None = None
        self.rank_feed: Callable | None = None

    def formula(self) -> str:
        lhs = " + ".join(f"{self.weights[n]:g} * {n}" for n in self.names)
        lines = [f"L = {lhs}"] + [f"  {n}: {self.terms[n].formula}" for n in self.names]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"terms": [{"name": n, "weight": self.weights[n], "formula": self.terms[n].formula} for n in self.names],
                "formula": self.formula()}

    def __call__(self, outputs: dict[str, torch.Tensor], batch, x: torch.Tensor):  # type: ignore[override]
        cache: dict[str, TeacherOutput] = {}

        def lazy(key: str, feed: Callable | None) -> Callable[[], TeacherOutput]:
            def get() -> TeacherOutput:
                if key not in cache:
                    if feed is None:
                        raise AgecliError(f"a loss term needs a {key} teacher but none was given.")
                    cache[key] = feed(batch, x)
                return cache[key]
            return get

        ctx = Context(outputs, batch, x, self.encoding, lazy("teacher", self.teacher_feed), lazy("rank", self.rank_feed))
        total = None
        parts: dict[str, float] = {}
        for name in self.names:
            value = self.terms[name](ctx)
            parts[name] = float(value.detach())
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
        return total, parts


def build_loss(spec: Sequence[dict[str, Any] | tuple[str, float, dict[str, Any]]]) -> DistillLoss:
    """From [{"name": "soft", "weight": 1, "kwargs": {"temperature": 4}}, ...] (or (name, weight, kwargs))."""
    terms = []
    for item in spec:
        name, weight, kwargs = ((item["name"], item.get("weight", 1.0), item.get("kwargs", {}))
                                if isinstance(item, dict) else item)
        if name not in LOSSES:
            raise AgecliError(f"unknown distillation loss {name!r}; known: {', '.join(LOSSES)}.")
        terms.append((name, weight, LOSSES[name](**kwargs)))
    return DistillLoss(terms)


# =========================================================================== the student wrapper
class Student(nn.Module):
    """What `fit` trains: the student plus the loss's learned parts (hint adapters).

    Checkpoints hold only the student: `save_checkpoint` unwraps `.module`, and
    `state_dict`/`load_state_dict` speak for the student alone (so best.pt/last.pt load with
    `load_checkpoint`); the loss's adapters travel in last.pt's training state instead."""

    def __init__(self, student: nn.Module, loss: DistillLoss, layer: str | None = None):
        super().__init__()
        self.module = student
        self.loss = loss
        self._hooked: list[torch.Tensor] = []
        self.layer = layer
        if layer:
            modules = dict(student.named_modules())
            if layer not in modules:
                raise AgecliError(f"the student has no layer {layer!r}; layers include: "
                                  f"{', '.join(n for n in list(modules)[1:40])} ...")
            self._handle = modules[layer].register_forward_hook(lambda _m, _i, out: self._hooked.append(out))

    def close(self) -> None:
        """Remove the layer hook (a probe wrapper must not leave it on the student)."""
        if self.layer:
            self._handle.remove()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._hooked.clear()
        out = dict(self.module(x))
        if self._hooked:
            h = self._hooked[-1]
            out["hint_source"] = h.mean(dim=(2, 3)) if h.ndim == 4 else h.flatten(1)
        return out

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)


# =========================================================================== stores
class _ConcatImages:
    """Rows of several memory-mapped face arrays, addressed as one."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        scalar = rows.ndim == 0
        rows = np.atleast_1d(rows)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for k, part in enumerate(self.parts):
            mask = which == k
            if mask.any():
                out[mask] = part[rows[mask] - self.offsets[k]]
        return out[0] if scalar else out


@dataclass
class ConcatStore:
    """A labelled store followed by an unlabelled one (its labels hidden), read as one FaceStore.

    Rows 0..n_labelled-1 are the labelled store's (splits kept); the unlabelled store's rows
    follow, all in the train split with unknown ages (the teacher labels them)."""

    root: Path
    images: Any
    records: pd.DataFrame
    manifest: dict[str, Any]
    parts: list[tuple[str, int, int]] = field(default_factory=list)  # (run, start, stop)

    @classmethod
    def of(cls, labelled: FaceStore | None, unlabelled: FaceStore) -> "ConcatStore":
        hidden = unlabelled.records.copy()
        for col in ("age", "age_std"):
            hidden[col] = np.nan
        hidden["gender"] = -1
        if labelled is None:
            # the unlabelled run alone: train on its train split, label-free; its val/test keep their
            # labels so the student can still be scored (they are never trained on)
            keep = unlabelled.records["split"] != "train"
            for col in ("age", "age_std", "gender"):
                hidden.loc[keep, col] = unlabelled.records.loc[keep, col]
            return cls(unlabelled.root, unlabelled.images, hidden.reset_index(drop=True), unlabelled.manifest,
                       [(str(unlabelled.root.parent), 0, len(hidden))])
        if labelled.size != unlabelled.size:
            raise AgecliError(f"the labelled run holds {labelled.size} px faces and the unlabelled run {unlabelled.size} "
                              "px faces; prepare both with the same --size.")
        if labelled.alignment.to_dict() != unlabelled.alignment.to_dict():
            warnings.warn(f"the labelled and unlabelled runs are aligned differently ({labelled.alignment} vs "
                          f"{unlabelled.alignment}); the student will see both framings.", stacklevel=2)
        hidden["split"] = "train"
        records = pd.concat([labelled.records, hidden], ignore_index=True)
        n = len(labelled.records)
        return cls(labelled.root, _ConcatImages([labelled.images, unlabelled.images]), records, labelled.manifest,
                   [(str(labelled.root.parent), 0, n), (str(unlabelled.root.parent), n, len(records))])

    alignment = FaceStore.alignment
    size = FaceStore.size
    dataset = FaceStore.dataset
    has_ages = FaceStore.has_ages
    indices = FaceStore.indices
    folds = FaceStore.folds


def store_key(store) -> str:
    """Content identity of a store (or a concatenation): its prepare manifests' file hashes."""

    if isinstance(store, ConcatStore):
        keys = [FaceStore.open(run).fingerprint() + f"[{a}:{b}]" for run, a, b in store.parts]
        return "+".join(keys)
    return store.fingerprint()


# =========================================================================== teacher feeding
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


class TeacherTable:
    """Teacher outputs for store rows, computed once and cached on disk (npy, atomic)."""

    def __init__(self, teacher: Teacher, store, indices, cache_dir: Path, *, batch_size: int = 256,
                 device: str = "cpu", progress: ProgressFn | None = None):
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        digest = hashlib.sha256()
        digest.update(json.dumps([teacher.cache_key(), store_key(store)]).encode())
        digest.update(indices.tobytes())
        self.key = digest.hexdigest()[:20]
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

    The crops are `data.draw_augment` numbers from a seeded generator, stored with the outputs.
    The bank belongs to the teacher and the faces, not to one student: students with other
    seeds pick other views in another order from the same bank.
    Each view is its own set of files (atomic, its `age` file written last), so an interrupted
    build goes on from the views it finished."""

    def __init__(self, teacher: Teacher, store, indices, views: int, cache_dir: Path, *, view_size: int,
                 augment=None, seed: int = 0, batch_size: int = 256, device: str = "cpu",
                 progress: ProgressFn | None = None):
        from dataclasses import asdict

        from agecli.data.batches import Augment, draw_augment

        if views < 1:
            raise AgecliError(f"--teacher-views must be at least 1 (got {views}); 0 runs the teacher live.")
        augment = augment or Augment()
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        digest = hashlib.sha256()
        digest.update(json.dumps([teacher.cache_key(), store_key(store), view_size, seed, asdict(augment)]).encode())
        digest.update(indices.tobytes())
        self.key = digest.hexdigest()[:20]
        self.dir = Path(cache_dir)
        generator = torch.Generator().manual_seed(seed)
        # view k's numbers do not depend on how many views there are: a larger bank reuses a smaller one
        self.params = torch.stack([draw_augment(len(indices), augment, generator) for _ in range(views)])
        ages, probs, self.built = [], [], 0
        started = time.perf_counter()
        for k in range(views):
            files = {name: self.dir / f"{self.key}.view{k}.{name}.npy" for name in ("params", "probs", "age")}
            # the stored numbers must be the ones drawn now (another torch could draw others for the seed)
            labelled = files["age"].exists() and np.array_equal(np.load(files["params"]), self.params[k].numpy())
            if not labelled:
                def report(label: str, done: int, total: int, k: int = k) -> None:
                    if progress:
                        progress(f"teacher view {k + 1}/{views}", done, total)

                data = predict_teacher(teacher, store, indices, batch_size=batch_size, device=device,
                                       progress=report, augment_params=self.params[k], view_size=view_size)
                _save_npy(files["params"], self.params[k].numpy())
                _save_npy(files["probs"], data["probs"].astype(np.float32))
                _save_npy(files["age"], data["age"].astype(np.float32))  # last: the view is complete
                self.built += 1
            ages.append(np.load(files["age"]))
            probs.append(np.load(files["probs"]))
        self.views, self.seconds = views, time.perf_counter() - started
        self.age = torch.from_numpy(np.stack(ages))        # (views, faces)
        self.probs = torch.from_numpy(np.stack(probs))     # (views, faces, ages)
        self.positions = RowPositions(len(store.records), indices)

    def draw(self, rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One stored view per row, at random: (view ids, their augmentation numbers)."""
        view_id = torch.randint(self.views, (len(rows),), generator=generator)
        return view_id, self.params[view_id, self.positions(rows)]

    def __call__(self, batch, x: torch.Tensor) -> TeacherOutput:
        if batch.view_id is None:
            raise RuntimeError("a teacher view bank needs batches augmented by it (fit(views=...))")
        pos, view_id = self.positions(batch.index), batch.view_id.cpu()
        return TeacherOutput(self.age[view_id, pos], self.probs[view_id, pos], None).to(x.device)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(array))


class LiveTeacher:
    """Runs the teacher on the student's own augmented batch: the crop at the teacher's
    resolution when fit made one (`batch.view`, see `fit(view_size=...)`), else the student's
    input un-normalised back to [0, 1]."""

    def __init__(self, teacher: Teacher, mean: Sequence[float], std: Sequence[float]):
        self.teacher, self.mean, self.std = teacher, tuple(mean), tuple(std)

    def __call__(self, batch, x: torch.Tensor) -> TeacherOutput:
        if getattr(batch, "view", None) is not None:
            return self.teacher(batch.view).to(x.device)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x01 = (x.detach().float() * std + mean).clamp_(0, 1)
        return self.teacher(x01).to(x.device)


# =========================================================================== ranking teacher
def listmle(scores: torch.Tensor, ages: torch.Tensor, k: int) -> torch.Tensor | None:
    """ListMLE over the batch cut into random sequences of k faces; sequences with tied ages are
    skipped. Higher score = older.

    The rows are shuffled here because a batch arrives sorted by store row (sequential reads),
    and UTKFace rows are sorted by file name, which starts with the age: consecutive faces
    would form nearly sorted, mostly tied sequences."""
    n = (len(scores) // k) * k
    if n == 0:
        return None
    perm = torch.randperm(len(scores), device=scores.device)[:n]
    s, a = scores[perm].float().view(-1, k), ages[perm].float().view(-1, k)
    order = torch.argsort(a, dim=1, descending=True)
    a_sorted = torch.gather(a, 1, order)
    distinct = (a_sorted[:, :-1] > a_sorted[:, 1:]).all(1)
    if not distinct.any():
        return None
    s_sorted = torch.gather(s, 1, order)[distinct]
    lse = torch.logcumsumexp(s_sorted.flip(1), 1).flip(1)
    return (lse - s_sorted).sum(1).mean()


def rank_accuracy(scores: np.ndarray, ages: np.ndarray) -> float:
    """Fraction of face pairs with different ages that the scores order correctly, a tie counting
    half (Kendall-style: 0.5 is chance, or a constant score)."""
    scores, ages = np.asarray(scores, float), np.asarray(ages, float)
    ds, da = scores[:, None] - scores[None, :], ages[:, None] - ages[None, :]
    pairs = da > 0
    if not pairs.any():
        return math.nan
    return float((ds[pairs] > 0).mean() + 0.5 * (ds[pairs] == 0).mean())


def train_rank_teacher(store, train_idx, val_idx, out_dir: Path, *, arch: str, size: int, k: int = 4,
                       options=None, pretrained: str | None = None, alignment: dict | None = None,
                       progress: ProgressFn | None = None) -> Path:
    """Train a ranking teacher (Zhao et al. 2021): shuffled sequences of k faces with distinct
    ages, a score head trained with ListMLE to recover their age order. Returns its best.pt
    (an agecli checkpoint whose "age" output is a rank score, label_space "rank scores")."""
    from agecli.modeling.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
    from agecli.modeling.encodings import Regression
    from agecli.modeling.backbones import IMAGENET_MEAN, IMAGENET_STD, build_model
    from agecli.stages.train import fit

    if k < 2:
        raise AgecliError(f"--rank-k must be at least 2 (got {k}).")
    options = options or TrainOptions()
    out_dir = Path(out_dir)
    done = out_dir / "rank_teacher.pt"
    if done.exists():
        return done
    torch.manual_seed(options.seed)
    enc = Regression()
    model = build_model(arch, enc, pretrained=pretrained)
    spec = ModelSpec(arch=arch, encoding=enc.to_dict(), input_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     alignment=alignment or {}, label_space="rank scores",
                     provenance={"stage": "distill", "task": "rank", "k": k, "options": options.to_dict()})

    def loss_fn(outputs, batch, x):
        known = ~torch.isnan(batch.age)
        loss = listmle(outputs["age"][known].squeeze(1), batch.age[known], k)
        if loss is None:
            loss = outputs["age"].sum() * 0.0
        return loss, {"listmle": float(loss.detach())}

    # no validation inside fit: MAE means nothing for scores; ranking accuracy is measured below
    fit(model, spec, store, train_idx, np.zeros(0, dtype=np.int64), out_dir, replace(options, patience=None),
        loss_fn=loss_fn, progress=progress)
    model, spec = load_checkpoint(out_dir / "best.pt")
    metrics: dict[str, Any] = {}
    if len(val_idx):
        from agecli.stages.evaluate import predict_store

        frame = predict_store(model, spec, store, val_idx, device="cpu")
        metrics = {"split": "val", "rank_accuracy": rank_accuracy(frame["age_pred"], frame["age"]), "n": len(frame)}
    spec.metrics = metrics
    save_checkpoint(done, model, spec)
    return done


# =========================================================================== the stage
@dataclass
class DistillConfig:
    """Method settings (defaults here are the documented defaults of `agecli distill`)."""

    methods: tuple[str, ...] = ("soft",)
    temperature: float = 4.0          # soft: softening temperature T
    alpha: float = 0.5                # weight of the ground-truth loss where labels exist (0 = teacher only)
    soft_weight: float = 1.0
    pseudo_weight: float = 1.0
    pseudo_hard: bool = False         # pseudo: teacher's expected age as a hard label instead of its distribution
    hint_weight: float = 1.0
    hint_layer: str | None = None     # teacher layer (agecli checkpoints) for hint; default pooled features
    student_layer: str | None = None  # student layer for hint/ordinal; default pooled features
    ordinal_weight: float = 1.0
    rank_k: int = 4                   # ordinal: faces per shuffled sequence
    rank_epochs: int | None = None    # ordinal: epochs of the ranking teacher (default: the student's)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def distill(run: str | Path | None = None, *, teachers: Sequence[str] = (), student: str = "mobilenet",
            method: str | Sequence[str] = "soft", size: int | None = None, encoding: str = "ldae",
            gender: bool = False, temperature: float = 4.0, alpha: float = 0.5, soft_weight: float = 1.0,
            pseudo_weight: float = 1.0, pseudo_hard: bool = False, hint_weight: float = 1.0,
            hint_layer: str | None = None, student_layer: str | None = None, ordinal_weight: float = 1.0,
            rank_k: int = 4, rank_epochs: int | None = None, rank_teacher: str | Path | None = None,
            teacher_specs: Sequence[str] | None = None, teacher_weights: Sequence[float] | None = None,
            teacher_device: str | None = None, teacher_half: bool = False, teacher_views: int = 0, recrop: bool = True,
            unlabelled: str | Path | None = None, pretrained: str | None = None, init: str | Path | None = None,
            name: str | None = None, options: TrainOptions | None = None,
            progress: ProgressFn | None = None) -> dict[str, Any]:
    """Distil teacher(s) into a student on a prepared run; writes RUN/distill/<name>/ and returns results.

    `method`: one of soft | pseudo | hint | ordinal, or several; the other keywords are the
    fields of `DistillConfig` (method settings) and `options` the training loop's `TrainOptions`.
    `teacher_views` > 0: the teacher labels that many fixed augmented crops of each training face
    once (`TeacherViews`) instead of running on every augmented batch.
    """
    from agecli.modeling.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
    from agecli.modeling.encodings import build_encoding
    from agecli.stages.evaluate import age_metrics, predict_store, score
    from agecli.modeling.backbones import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, build_model, count_parameters, resolve_arch
    from agecli.stages.train import fit, labelled, load_init

    config = DistillConfig(methods=(method,) if isinstance(method, str) else tuple(method), temperature=temperature,
                           alpha=alpha, soft_weight=soft_weight, pseudo_weight=pseudo_weight, pseudo_hard=pseudo_hard,
                           hint_weight=hint_weight, hint_layer=hint_layer, student_layer=student_layer,
                           ordinal_weight=ordinal_weight, rank_k=rank_k, rank_epochs=rank_epochs)
    options = options or TrainOptions()
    methods = tuple(dict.fromkeys(config.methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise AgecliError(f"unknown method(s) {bad or '(none)'}; choose from {', '.join(METHODS)} "
                          "(combinable: --method soft --method hint).")
    arch = resolve_arch(student)
    teachers = list(teachers)
    if "pseudo" in methods and unlabelled is None:
        raise AgecliError("--method pseudo needs an unlabelled face set: --unlabelled RUN (a `prepare folder` run, "
                          "or any run whose labels are ignored).")
    if run is None and unlabelled is not None:
        base_run = None
    else:
        base_run = resolve_run(run)
    labelled_store = FaceStore.open(base_run) if base_run is not None else None
    if unlabelled is not None:
        unl_store = FaceStore.open(resolve_run(unlabelled))
        store = ConcatStore.of(labelled_store, unl_store)
        out_run = base_run or resolve_run(unlabelled)
    else:
        store = labelled_store
        out_run = base_run
    if not teachers and not store.has_ages:
        raise AgecliError(f"run {out_run} has no age labels and no --teacher was given: there is nothing to learn from. "
                          "Give a teacher (e.g. --teacher dlib-age) or a labelled run.")
    needs_teacher = any(m in methods for m in ("soft", "pseudo", "hint"))
    if needs_teacher and not teachers:
        raise AgecliError(f"--method {'/'.join(methods)} needs a teacher: --teacher PATH.pt | MODEL.onnx | dlib-age.")
    if "ordinal" in methods and not teachers:
        raise AgecliError("--method ordinal distils a ranking teacher together with the dark knowledge of a "
                          "classification teacher: give that one with --teacher (ideally a checkpoint of the "
                          "student's architecture trained with --encoding classification).")

    if teacher_views < 0:
        raise AgecliError(f"--teacher-views must be 0 (the teacher runs live) or more (got {teacher_views}).")
    if teacher_views and not options.augment:
        raise AgecliError("--teacher-views stores the teacher's outputs on augmented crops, but --no-augment is "
                          "set (and then the outputs are cached anyway): drop one of the two.")
    if teacher_views and any(m in methods for m in ("hint", "ordinal")):
        raise AgecliError("--teacher-views stores the teacher's age distributions only, which serve --method soft "
                          "and pseudo; hint and ordinal need the teacher live: use --teacher-views 0.")
    train_idx = store.indices("train")
    train_labelled = labelled(store, train_idx)
    val_idx = labelled(store, store.indices("val"))
    test_idx = labelled(store, store.indices("test"))
    if len(train_idx) < 16:
        raise AgecliError(f"run {out_run} has only {len(train_idx)} training faces; at least 16 are needed.")
    if not len(train_labelled) and config.alpha > 0 and "pseudo" not in methods and not teachers:
        raise AgecliError(f"run {out_run} has no labelled training faces; give a teacher.")

    enc = build_encoding(encoding)
    size = size or min(store.size, BACKBONES[arch].default_size)
    if size > store.size:
        raise AgecliError(f"--size {size} is larger than the run's {store.size} px faces; use --size {store.size} "
                          "or less, or re-prepare with a larger --size.")
    from agecli.engine.distributed import resolve_device

    device = resolve_device(options.device)
    teacher_device = resolve_device(teacher_device or device)
    teacher = build_teacher(teachers, specs=teacher_specs, weights=teacher_weights, device=teacher_device,
                            half=teacher_half, hint_layer=config.hint_layer) if teachers else None
    notes: list[str] = []
    store_alignment = store.manifest.get("alignment")
    if teacher is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            teacher.bind(store_alignment, store.size, dataset=store.dataset, recrop=recrop)
        notes += [str(w.message) for w in caught]

    base = name or f"{arch}_from_{teacher.name if teacher else 'labels'}".replace("/", "_")
    parent = out_run / "distill"
    if options.resume:
        if not (parent / base / "last.pt").exists():
            raise AgecliError(f"--resume: {parent / base / 'last.pt'} does not exist; nothing to resume.")
        name = base
    else:
        name = unique_name(parent, base)
    out_dir = parent / name

    torch.manual_seed(options.seed)
    model = build_model(arch, enc, gender=gender, pretrained=pretrained)
    init_info = load_init(model, init) if init else None

    # ---- the loss
    terms: list[tuple[str, float, dict[str, Any]]] = []
    if config.alpha > 0 and (store.has_ages or gender):
        terms.append(("gt", config.alpha, {"gender": gender}))
    if "soft" in methods or "ordinal" in methods:
        terms.append(("soft", config.soft_weight, {"temperature": config.temperature}))
    if "pseudo" in methods:
        terms.append(("pseudo", config.pseudo_weight, {"hard": config.pseudo_hard}))
    args = {"teachers": teachers, "teacher_specs": list(teacher_specs or []), "teacher_weights": teacher_weights,
            "student": arch, "size": size, "encoding": enc.to_dict(), "gender": gender, "config": config.to_dict(),
            "unlabelled": str(unlabelled) if unlabelled else None, "rank_teacher": str(rank_teacher) if rank_teacher else None,
            "recrop": recrop, "teacher_views": teacher_views, "pretrained": pretrained, "init": str(init) if init else None, "name": name,
            "options": options.to_dict()}
    inputs = {"prepare": store_key(store), "teacher": teacher.fingerprint() if teacher else None}

    with Stage(out_run, "distill", name, args=args, inputs=inputs) as stage:
        cache_dir = out_run / "teacher_cache"   # content-keyed: students with other seeds or losses share it
        feeds_cached = not options.augment
        teacher_feed = views = None
        probe_rows = train_idx[:4]
        if teacher is not None:
            if teacher_views:
                if options.threads:  # the bank is built before fit sets the threads
                    torch.set_num_threads(options.threads)
                views = TeacherViews(teacher, store, train_idx, teacher_views, cache_dir,
                                     view_size=min(store.size, teacher.input_size), device=teacher_device,
                                     progress=progress)
                teacher_feed = views
                stage.set(teacher_cache={"key": views.key, "views": teacher_views, "built": views.built,
                                         "seconds": round(views.seconds, 3)})
            elif feeds_cached:
                table = TeacherTable(teacher, store, np.concatenate([train_idx, test_idx]), cache_dir,
                                     device=teacher_device, progress=progress)
                teacher_feed = table
                stage.set(teacher_cache={"key": table.key, "hit": table.hit})
            else:
                teacher_feed = LiveTeacher(teacher, IMAGENET_MEAN, IMAGENET_STD)
        rank_feed = None
        rank_info = None
        if "ordinal" in methods:
            rank_path = Path(rank_teacher) if rank_teacher else None
            if rank_path is None:
                rank_opts = replace(options, epochs=config.rank_epochs or options.epochs, resume=False)
                rank_path = train_rank_teacher(store, train_labelled, val_idx, out_dir / "rank_teacher", arch=arch,
                                               size=size, k=config.rank_k, options=rank_opts, pretrained=pretrained,
                                               alignment=store_alignment, progress=progress)
            ranker = load_teacher(str(rank_path), device=teacher_device, half=teacher_half)
            ranker.bind(store_alignment, store.size, dataset=store.dataset, recrop=recrop)
            rank_info = {"path": str(rank_path), "metrics": ranker.spec.metrics, "fingerprint": ranker.fingerprint()}
            rank_feed = (TeacherTable(ranker, store, train_idx, cache_dir, device=teacher_device, progress=progress)
                         if feeds_cached else LiveTeacher(ranker, IMAGENET_MEAN, IMAGENET_STD))
            terms.append(("ordinal", config.ordinal_weight, {}))
        if "hint" in methods:
            probe = _probe(model, teacher, store, probe_rows, size, config.student_layer)
            if probe["teacher_dim"] is None:
                raise AgecliError(f"--method hint needs teacher features, but {teacher.name} exposes none "
                                  "(ONNX teachers: name a tensor with features=... in --teacher-spec).")
            terms.append(("hint", config.hint_weight, {"student_dim": probe["student_dim"],
                                                        "teacher_dim": probe["teacher_dim"]}))
        if not terms:
            raise AgecliError("nothing to learn: --alpha 0 and no distillation method that applies.")
        loss = build_loss(terms)
        loss.encoding, loss.teacher_feed, loss.rank_feed = enc, teacher_feed, rank_feed
        wrapped = Student(model, loss, layer=config.student_layer)
        # live teachers with a larger input see the student's augmented crop at their own resolution
        live = [f.teacher for f in (teacher_feed, rank_feed) if isinstance(f, LiveTeacher)]
        view_size = min(store.size, max(t.input_size for t in live)) if live else None
        recipe = {"student": arch, "size": size, "encoding": enc.to_dict(), "methods": list(methods),
                  "loss": loss.to_dict(), "teacher": teacher.describe() if teacher else None, "rank_teacher": rank_info,
                  "teacher_inputs": ("cached (no augmentation)" if feeds_cached else
                                     f"a bank of {teacher_views} augmented views per face" if views else
                                     "live on the augmented batch"),
                  "view_size": view_size,
                  "warnings": notes}
        write_json(out_dir / "recipe.json", recipe)

        spec = ModelSpec(
            arch=arch, encoding=enc.to_dict(), input_size=size, gender=gender, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            alignment=store_alignment or store.alignment.to_dict(),
            label_space=store.manifest.get("label_space", "ages 0-100"), data_fingerprint=store_key(store),
            provenance={"stage": "distill", "run": str(out_run), "name": name, "dataset": store.dataset,
                        "method": list(methods), "loss": loss.to_dict()["terms"],
                        "teachers": teacher.describe() if teacher else None, "rank_teacher": rank_info,
                        "args": args, "init": init_info and {k: v for k, v in init_info.items() if k != "skipped"}})
        results = fit(wrapped, spec, store, train_idx, val_idx, out_dir, options, loss_fn=loss, progress=progress,
                      view_size=view_size, views=views)

        # ---- scoring: student, teacher, agreement on the test split (val when there is no test)
        eval_idx, eval_split = (test_idx, "test") if len(test_idx) else (val_idx, "val")
        student_model, student_spec = load_checkpoint(out_dir / "best.pt", device)
        metrics: dict[str, Any] = {"split": eval_split}
        if len(eval_idx):
            frame = predict_store(student_model, student_spec, store, eval_idx, device=device,
                                  batch_size=options.val_batch_size, progress=progress)
            metrics["student"] = score(frame)
            if teacher is not None:
                t_out = (table.lookup(torch.from_numpy(eval_idx)) if feeds_cached and len(test_idx)
                         else _teacher_on(teacher, store, eval_idx, teacher_device, progress))
                t_age = t_out.age.numpy()
                frame["teacher_age"] = t_age
                metrics["teacher"] = age_metrics(t_age, frame["age"].to_numpy(), frame["age_std"].to_numpy())
                metrics["agreement_mae"] = float(np.abs(frame["age_pred"].to_numpy() - t_age).mean())
            write_csv(out_dir / f"{eval_split}_predictions.csv", frame)
        metrics["speed"] = _speed(student_model, student_spec, teacher, device)
        metrics["student_parameters"] = count_parameters(student_model)
        student_spec.metrics = {**student_spec.metrics, eval_split: metrics.get("student"),
                                "teacher": metrics.get("teacher"), "agreement_mae": metrics.get("agreement_mae")}
        save_checkpoint(out_dir / "student.pt", student_model, student_spec)
        write_json(out_dir / "metrics.json", {"val": results["val"], **metrics})
        results.update({"run": str(out_run), "name": name, "dir": str(out_dir), "student": arch, "input_size": size,
                        "methods": list(methods), "formula": loss.formula(), "metrics": metrics,
                        "checkpoint": str(out_dir / "student.pt"), "warnings": notes,
                        "teacher": teacher.describe() if teacher else None})
        stage.complete(results={k: v for k, v in results.items() if k not in ("teacher",)})
    return results


def _teacher_on(teacher: Teacher, store, indices, device, progress) -> TeacherOutput:
    data = predict_teacher(teacher, store, indices, device=device, progress=progress)
    return TeacherOutput(torch.from_numpy(data["age"]), torch.from_numpy(data["probs"]))


@torch.inference_mode()
def _probe(model, teacher: Teacher | None, store, rows, size: int, student_layer: str | None) -> dict[str, Any]:
    """Feature widths of student (pooled or a named layer) and teacher, from two faces."""
    from agecli.data.batches import to_input
    from agecli.modeling.backbones import IMAGENET_MEAN, IMAGENET_STD

    images = torch.from_numpy(np.ascontiguousarray(store.images[np.sort(rows[:2])]))
    x = to_input(images, size, IMAGENET_MEAN, IMAGENET_STD)
    was = model.training
    model.eval()
    wrapped = Student(model, DistillLoss([]), layer=student_layer)
    out = wrapped(x)
    wrapped.close()
    model.train(was)
    f_s = out.get("hint_source", out["features"])
    t_dim = None
    if teacher is not None:
        t = teacher(images.permute(0, 3, 1, 2).float() / 255)
        t_dim = None if t.features is None else int(t.features.shape[1])
    return {"student_dim": int(f_s.shape[1]), "teacher_dim": t_dim}


def _speed(model, spec, teacher: Teacher | None, device: str, batch: int = 32, reps: int = 5) -> dict[str, Any]:
    """Median ms per face of student and teacher on `device` (batch 32, after warm-up): the speed ratio."""
    def timed(fn) -> float:
        for _ in range(2):
            fn()
        times = []
        for _ in range(reps):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return float(np.median(times)) * 1000 / batch

    gen = torch.Generator().manual_seed(0)
    x01 = torch.rand(batch, 3, spec.input_size, spec.input_size, generator=gen)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    x = ((x01 - mean) / std).to(device)
    with torch.inference_mode():
        out = {"batch": batch, "threads": torch.get_num_threads(), "device": device,
               "student_ms_per_face": timed(lambda: model(x))}
        if teacher is not None:
            xt = torch.rand(batch, 3, teacher.input_size, teacher.input_size, generator=gen).to(device)
            out["teacher_ms_per_face"] = timed(lambda: teacher(xt))
            out["speedup"] = out["teacher_ms_per_face"] / max(out["student_ms_per_face"], 1e-9)
    return out
