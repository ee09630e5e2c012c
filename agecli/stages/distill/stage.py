"""The distill stage: `distill(run, teachers=[...], student=..., method=...)`, the Python face of
`agecli distill`. It checks the request, binds the teachers to the run's faces, builds the
loss and its teacher feeds, trains the student with the shared loop (agecli.engine.loop.fit)
and scores it next to its teacher, around the prelude and epilogue it shares with the train
stage (agecli.stages.common)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from agecli.device import require_device
from agecli.engine import distributed
from agecli.engine.loop import InputFn, fit
from agecli.engine.metrics import age_metrics, score
from agecli.engine.timing import time_call
from agecli.errors import AgecliError
from agecli.modeling.backbones import count_parameters, default_normalisation, resolve_arch
from agecli.modeling.checkpoint import Seen, read_seen
from agecli.modeling.zoo import resolve_model_ref
from agecli.modeling.encodings import Encoding, build_encoding
from agecli.options import DistillOptions, TrainOptions
from agecli.progress import ProgressFn
from agecli.rundir import resolve_run, write_csv, write_json
from agecli.stages.common import (input_size, labelled, learned_from, load_best, model_spec, open_stage, output_name,
                                  predict_rows, require_faces, seeded_model, update_best, write_metrics)
from agecli.stages.distill.feeds import (CropForTeacher, LiveTeacher, MirrorPairs, TeacherTable, TeacherViews,
                                        teacher_on)
from agecli.stages.distill.losses import DistillLoss, TeacherFeed, build_loss
from agecli.stages.distill.ranker import train_rank_teacher
from agecli.stages.distill.stores import ConcatStore, store_key
from agecli.stages.distill.student import Student, feature_widths
from agecli.stages.teachers import Teacher, build_teacher, load_teacher, sidecar_files
from agecli.store import FaceStore, face_keys, hide_labels


def distill(run: str | Path | None = None, *, teachers: Sequence[str] = (), student: str = "mobilenet",
            size: int | None = None, encoding: str = "ldae", gender: bool = False,
            unlabelled: str | Path | None = None, rank_teacher: str | Path | None = None,
            teacher_specs: Sequence[str] | None = None, teacher_weights: Sequence[float] | None = None,
            pretrained: str | None = None, init: str | Path | None = None, name: str | None = None,
            options: TrainOptions | None = None, config: DistillOptions | None = None,
            progress: ProgressFn | None = None, **settings: Any) -> dict[str, Any]:
    """Distil teacher(s) into a student on a prepared run; writes RUN/distill/<name>/ and returns results.

    `config` (DistillOptions) says how to distil: method (soft | pseudo | hint | ordinal, or
    several), loss weights, temperature, teacher views, ...; its fields can be given as
    keywords too (`method="soft", alpha=0.0`), overriding `config`'s. `options` (TrainOptions)
    are the training loop's knobs. `teacher_views` > 0: the teacher labels that many fixed
    augmented crops of each training face once (`TeacherViews`) instead of running on every
    augmented batch.
    """
    config = _config(config, settings)
    options = options or TrainOptions()
    world = distributed.from_env()
    arch = resolve_arch(student)
    teachers = list(teachers)
    (store, out_run), store_notes = said(lambda: _open_store(run, unlabelled, options.labelled_fraction))
    _check_request(config, options, teachers, store, out_run, unlabelled is not None)
    rows = _Rows.of(store)
    require_faces(len(rows.train), out_run, store, "training faces")
    enc = build_encoding(encoding)
    size = input_size(size, store, arch)
    norm = default_normalisation(arch)  # what the student's pretrained weights expect, as in train
    device = require_device(options.device)
    teacher_device = require_device(config.teacher_device or device)
    teacher, notes = _bound_teacher(teachers, teacher_specs, teacher_weights, teacher_device, config, store)
    notes = store_notes + notes + _leaks([*teachers, rank_teacher], store, rows, options.labelled_fraction)
    base = name or f"{arch}_from_{teacher.name if teacher else 'labels'}".replace("/", "_")
    name = output_name(out_run / "distill", base, options.resume, world)
    out_dir = out_run / "distill" / name
    model, init_info = seeded_model(arch, enc, gender=gender, pretrained=pretrained, init=init, seed=options.seed)
    args = {"teachers": teachers, "teacher_specs": list(teacher_specs or []), "teacher_weights": teacher_weights,
            "student": arch, "size": size, "encoding": enc.to_dict(), "gender": gender, "config": config.to_dict(),
            "unlabelled": str(unlabelled) if unlabelled else None,
            "rank_teacher": str(rank_teacher) if rank_teacher else None, "recrop": config.recrop,
            "teacher_views": config.teacher_views, "pretrained": pretrained, "init": str(init) if init else None,
            "name": name, "options": options.to_dict()}
    inputs = {"prepare": store_key(store), "teacher": teacher.fingerprint() if teacher else None}
    models = [Path(resolve_model_ref(m)) for m in [*teachers, rank_teacher, init] if m]
    spec_files = [f for m in models if m.suffix.lower() == ".onnx" for f in sidecar_files(m)]   # how it is fed
    reads = [out_run, unlabelled, *models, *spec_files, pretrained]
    with open_stage(world, out_run, "distill", name, args, inputs, reads=reads) as stage:
        feeds = _Feeds.build(teacher, store, rows, config, options, out_run / "teacher_cache", teacher_device,
                             norm, progress)
        if feeds.cache_record:
            stage.set(teacher_cache=feeds.cache_record)
        student_options = options
        if "ordinal" in config.method:
            started = time.monotonic()
            feeds.add_ranker(rank_teacher, store, rows, out_dir, arch=arch, size=size, pretrained=pretrained,
                             config=config, options=options, progress=progress)
            student_options = time_left(options, time.monotonic() - started)
            stage.set(rank_teacher=feeds.rank_info)
        loss = _loss(config, store, gender, enc, feeds, model, size, rows)
        spec = model_spec("distill", store, out_run, name, arch=arch, encoding=enc, size=size, gender=gender,
                          mean=norm[0], std=norm[1], fingerprint=store_key(store), args=args,
                          init_info=init_info, method=list(config.method), loss=loss.to_dict()["terms"],
                          teachers=teacher.describe() if teacher else None, rank_teacher=feeds.rank_info)
        if world.main:
            write_json(out_dir / "recipe.json", _recipe(arch, size, enc, config, loss, feeds, notes + feeds.notes))
        seen = learned_from(store, rows.train, rows.train_labelled, *teachers, rank_teacher, init)
        results = fit(Student(model, loss, layer=config.student_layer), spec, store, rows.train, rows.val, out_dir,
                      student_options, loss_fn=loss, progress=progress, make_input=feeds.make_input,
                      extra_state={"loss_state": loss}, seen=seen)
        results.update({"run": str(out_run), "name": name, "dir": str(out_dir), "student": arch, "input_size": size,
                        "methods": list(config.method), "formula": loss.formula(),
                        "checkpoint": str(out_dir / "best.pt"), "warnings": notes + feeds.notes,
                        "teacher": teacher.describe() if teacher else None,
                        **rows.counts(options.labelled_fraction)})
        if world.main:
            results["metrics"] = _score(out_dir, store, rows, feeds, options, progress, seen)
            results["test"] = _write_metrics(out_dir, results["val"], results["metrics"])["test"]
            stage.complete(results={k: v for k, v in results.items() if k not in ("teacher",)})
    return results


RANKER_TIME_SHARE = 0.5  # of --time-limit, at most, for a ranking teacher trained in the stage


def time_left(options: TrainOptions, spent_seconds: float) -> TrainOptions:
    """`options` with `time_limit` less what the stage has spent before the student's training
    (the ranker trained here), so that --time-limit bounds the whole stage. At least one
    second is left: the student then trains one epoch, which a cut schedule always keeps."""
    if options.time_limit is None:
        return options
    return replace(options, time_limit=max(options.time_limit - spent_seconds / 60, 1 / 60))


def _config(config: DistillOptions | None, settings: dict[str, Any]) -> DistillOptions:
    """`config` with the DistillOptions fields given as keywords of `distill` put in."""
    known = {f.name for f in fields(DistillOptions)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"distill() got unexpected keyword argument(s) {', '.join(unknown)}; DistillOptions "
                        f"fields are {', '.join(sorted(known))}")
    return replace(config or DistillOptions(), **settings)


def _open_store(run, unlabelled, labelled_fraction: float = 1.0) -> tuple[FaceStore | ConcatStore, Path]:
    """The faces to train on (the labelled run, the unlabelled one, or both) and the run to write into.
    Below labelled_fraction 1 the training faces it does not keep lose their labels
    (`agecli.store.hide_labels`): every term sees them, the gt term skips them as unlabelled."""
    base_run = None if run is None and unlabelled is not None else resolve_run(run)
    store = FaceStore.open(base_run) if base_run is not None else None
    if unlabelled is not None:
        store = ConcatStore.of(store, FaceStore.open(resolve_run(unlabelled)))
    return hide_labels(store, store.indices("train"), labelled_fraction), base_run or resolve_run(unlabelled)


def _check_request(config: DistillOptions, options: TrainOptions, teachers: list[str], store, out_run: Path,
                   with_unlabelled_run: bool) -> None:
    """Refuse what cannot work: nothing to learn from, a method without the teacher or the
    unlabelled faces it needs, teacher views that would not be used."""
    if "pseudo" in config.method and not with_unlabelled_run and options.labelled_fraction >= 1:
        raise AgecliError("--method pseudo needs unlabelled faces: --unlabelled RUN (a `prepare folder` run, or any "
                          "run whose labels are ignored), or --labelled-fraction below 1 (the training faces whose "
                          "labels it hides).")
    if not teachers and not store.has_ages:
        raise AgecliError(f"run {out_run} has no age labels and no --teacher was given: there is nothing to learn from. "
                          "Give a teacher (e.g. --teacher dlib-age) or a labelled run.")
    methods = config.method
    if any(m in methods for m in ("soft", "pseudo", "hint")) and not teachers:
        raise AgecliError(f"--method {'/'.join(methods)} needs a teacher: --teacher PATH.pt | MODEL.onnx | dlib-age.")
    if "ordinal" in methods and not teachers:
        raise AgecliError("--method ordinal distils a ranking teacher together with the dark knowledge of a "
                          "classification teacher: give that one with --teacher (ideally a checkpoint of the "
                          "student's architecture trained with --encoding classification).")
    if config.teacher_views and not options.augment:
        raise AgecliError("--teacher-views stores the teacher's outputs on augmented crops, but --no-augment is "
                          "set (and then the outputs are cached anyway): drop one of the two.")
    if config.mirror_pairs and teachers and not config.teacher_mirror and (config.teacher_views or not options.augment):
        # stored answers are looked up by face and crop: the mirror image would get the crop's answer
        raise AgecliError("--mirror-pairs trains on each crop's mirror image too, but the teacher's answers are "
                          "stored for the crop alone (--teacher-views, or --no-augment): add --teacher-mirror so "
                          "they hold for both sides, or use --teacher-views 0 (the teacher then sees each side).")
    if config.teacher_views and "hint" in methods:
        # ordinal is fine: its ranking teacher runs live on the student's crop, the bank serves the soft term
        raise AgecliError("--teacher-views stores the teacher's age distributions only, which serve --method soft, "
                          "pseudo and ordinal; hint needs the teacher's features live: use --teacher-views 0.")


@dataclass
class _Rows:
    train: np.ndarray            # every training face, labelled or not
    train_labelled: np.ndarray   # those with labels (the ones labelled_fraction keeps; see _open_store)
    val: np.ndarray              # labelled only, as test
    test: np.ndarray

    @classmethod
    def of(cls, store) -> "_Rows":
        train = store.indices("train")
        return cls(train, labelled(store, train), labelled(store, store.indices("val")),
                   labelled(store, store.indices("test")))

    def counts(self, labelled_fraction: float) -> dict[str, Any]:
        """Training faces for the results: those with labels (the gt term's) and those without (hidden by
        labelled_fraction or from --unlabelled); the teacher terms see both."""
        return {"labelled_fraction": labelled_fraction, "labelled_faces": int(len(self.train_labelled)),
                "unlabelled_faces": int(len(self.train) - len(self.train_labelled))}


def _leaks(teachers: Sequence[str | Path | None], store, rows: _Rows, labelled_fraction: float) -> list[str]:
    """Where a teacher (or the ranking teacher) learned from what this student must not: its
    test faces (its test score would not be held out), or the labels --labelled-fraction hides
    from it (they reach it through the teacher). An image the student has a label for anyway (a
    duplicate of a labelled one) is no leak."""
    hidden = np.setdiff1d(rows.train, rows.train_labelled) if labelled_fraction < 1 else rows.train[:0]
    hidden_keys = np.setdiff1d(face_keys(store.records, hidden), face_keys(store.records, rows.train_labelled))
    notes = []
    for teacher in teachers:
        seen = read_seen(resolve_model_ref(teacher)) if teacher else None
        if seen is None:
            continue
        tested, told = seen.count(face_keys(store.records, rows.test)), seen.count(hidden_keys, labels=True)
        if tested:
            notes.append(f"teacher {teacher} learned from {tested} of the run's {len(rows.test)} test faces: the "
                         "student's test score is not a held-out one. Use a teacher trained on this run's split.")
        if told:
            notes.append(f"teacher {teacher} learned the labels of {told} faces whose labels --labelled-fraction "
                         "hides from the student: they reach it through the teacher. Train the teacher with the same "
                         "--labelled-fraction for a fair comparison.")
    return notes


def _bound_teacher(teachers: list[str], specs, weights, device: str, config: DistillOptions,
                   store) -> tuple[Teacher | None, list[str]]:
    """The teacher (or ensemble), bound to the store's crops; with the warnings binding gave."""
    if not teachers:
        return None, []
    teacher = build_teacher(teachers, specs=specs, weights=weights, device=device, half=config.teacher_half,
                            hint_layer=config.hint_layer).set_mirror(config.teacher_mirror)
    _, notes = said(lambda: teacher.bind(store.manifest.get("alignment"), store.size, dataset=store.dataset,
                                         recrop=config.recrop))
    return teacher, notes


def said(call: Callable[[], Any]) -> tuple[Any, list[str]]:
    """`call()`'s result and the warnings it gave, as text: they become the stage's warnings,
    printed as agecli's and kept in its results, rather than Python's `file:line: UserWarning`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught]


@dataclass
class _Feeds:
    """How the loss gets the teachers' answers, and how fit makes the student's input to match."""

    teacher: Teacher | None
    cached: bool                             # un-augmented inputs: answers computed once (TeacherTable)
    store_size: int                          # side of the stored faces: no teacher's crop is larger
    device: str                              # where the teachers run
    teacher_feed: TeacherFeed | None = None
    table: TeacherTable | None = None
    views: TeacherViews | None = None
    rank_feed: TeacherFeed | None = None
    rank_info: dict[str, Any] | None = None
    cache_record: dict[str, Any] | None = None   # for the manifest's "teacher_cache"
    cache_dir: Path | None = None
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # the student's input (mean, std)
    notes: list[str] = field(default_factory=list)   # warnings of the ranking teacher's binding
    mirror_pairs: bool = False                        # every step also trains on the crops' mirror images

    @classmethod
    def build(cls, teacher: Teacher | None, store, rows: _Rows, config: DistillOptions, options: TrainOptions,
              cache_dir: Path, device: str, norm, progress: ProgressFn | None) -> "_Feeds":
        # cache_dir is content-keyed: students with other seeds or losses share it
        feeds = cls(teacher, cached=not options.augment, store_size=store.size, device=device, cache_dir=cache_dir,
                    norm=norm, mirror_pairs=config.mirror_pairs)
        if teacher is None:
            return feeds
        if config.teacher_views:
            if options.threads:  # the bank is built before fit sets the threads
                torch.set_num_threads(options.threads)
            feeds.views = TeacherViews(teacher, store, rows.train, config.teacher_views, cache_dir,
                                       view_size=min(store.size, teacher.input_size), device=device, progress=progress)
            feeds.teacher_feed = feeds.views
            feeds.cache_record = {"key": feeds.views.key, "views": config.teacher_views, "built": feeds.views.built,
                                  "seconds": round(feeds.views.seconds, 3)}
        elif feeds.cached:
            feeds.table = TeacherTable(teacher, store, np.concatenate([rows.train, rows.test]), cache_dir,
                                       device=device, progress=progress)
            feeds.teacher_feed = feeds.table
            feeds.cache_record = {"key": feeds.table.key, "hit": feeds.table.hit}
        else:
            feeds.teacher_feed = LiveTeacher(teacher, *norm)
        return feeds

    def add_ranker(self, rank_teacher, store, rows: _Rows, out_dir: Path, *, arch: str, size: int, pretrained,
                   config: DistillOptions, options: TrainOptions, progress: ProgressFn | None) -> None:
        """The ranking teacher of --method ordinal: the one given, or one trained here first (from
        the student's pretrained weights, validated by val rank accuracy, best epoch kept, early
        stopped; at most --rank-epochs, else the student's epochs, and at most RANKER_TIME_SHARE
        of --time-limit). `rank_info` carries its val rank accuracy, best and per epoch."""
        rank_path = Path(rank_teacher) if rank_teacher else None
        if rank_path is None:
            # the ranker is the paper's: trained on clean faces even when the student's are degraded;
            # under a time limit it gets at most a share of it, the student the rest (`time_left`)
            limit = options.time_limit * RANKER_TIME_SHARE if options.time_limit else None
            rank_options = replace(options, epochs=config.rank_epochs or options.epochs, resume=False,
                                   robust_augment=0.0, time_limit=limit)
            rank_path = train_rank_teacher(store, rows.train_labelled, rows.val, out_dir / "rank_teacher", arch=arch,
                                           size=size, k=config.rank_k, options=rank_options, pretrained=pretrained,
                                           alignment=store.manifest.get("alignment"), progress=progress)
        ranker = load_teacher(str(rank_path), device=self.device, half=config.teacher_half)
        _, notes = said(lambda: ranker.bind(store.manifest.get("alignment"), store.size, dataset=store.dataset,
                                            recrop=config.recrop))
        self.notes += [f"ranking teacher: {note}" for note in notes]
        metrics = ranker.spec.metrics or {}
        self.rank_info = {"path": str(rank_path), "val_rank_accuracy": metrics.get("rank_accuracy"),
                          "val_rank_accuracy_per_epoch": [h["rank_accuracy"] for h in metrics.get("history", [])],
                          "metrics": metrics, "fingerprint": ranker.fingerprint()}
        self.rank_feed = (TeacherTable(ranker, store, rows.train, self.cache_dir, device=self.device,
                                       progress=progress)
                          if self.cached else LiveTeacher(ranker, *self.norm))

    @property
    def view_size(self) -> int | None:
        """Live teachers with a larger input see the student's augmented crop at their own resolution."""
        live = [f.teacher for f in (self.teacher_feed, self.rank_feed) if isinstance(f, LiveTeacher)]
        return min(self.store_size, max(t.input_size for t in live)) if live else None

    def input_kind(self) -> str:
        pairs = ", each crop with its mirror image" if self.mirror_pairs else ""
        if self.cached:
            return "cached (no augmentation)" + pairs
        if self.views:
            return f"a bank of {self.views.views} augmented views per face" + pairs
        return "live on the augmented batch" + pairs

    @property
    def make_input(self) -> InputFn | None:
        """fit's input function: the view bank's crops, a crop at a live teacher's size, or plain;
        under mirror pairs, followed by their mirror images."""
        if self.views is not None:
            inner = self.views.make_input
        else:
            inner = CropForTeacher(self.view_size) if self.view_size else None
        return MirrorPairs(inner) if self.mirror_pairs else inner


def _loss(config: DistillOptions, store, gender: bool, enc: Encoding, feeds: _Feeds, model: torch.nn.Module,
          size: int, rows: _Rows) -> DistillLoss:
    """The weighted terms the methods ask for, wired to their feeds. The hint adapter's shape
    comes from probing student and teacher (its random init follows the model's, as before)."""
    methods = config.method
    terms: list[tuple[str, float, dict[str, Any]]] = []
    if config.alpha > 0 and (store.has_ages or gender):
        terms.append(("gt", config.alpha, {"gender": gender}))
    if "soft" in methods or "ordinal" in methods:
        terms.append(("soft", config.soft_weight, {"temperature": config.temperature}))
    if "pseudo" in methods:
        terms.append(("pseudo", config.pseudo_weight, {"hard": config.pseudo_hard}))
    if "ordinal" in methods:
        terms.append(("ordinal", config.ordinal_weight, {}))
    if config.mirror_pairs:
        terms.append(("mirror", config.mirror_weight, {}))
    if "hint" in methods:
        widths = feature_widths(model, feeds.teacher, store, rows.train[:4], size, config.student_layer,
                                feeds.norm)
        if widths["teacher_dim"] is None:
            raise AgecliError(f"--method hint needs teacher features, but {feeds.teacher.name} exposes none "
                              "(ONNX teachers: name a tensor with features=... in --teacher-spec).")
        terms.append(("hint", config.hint_weight, widths))
    loss = build_loss(terms)
    loss.encoding, loss.teacher_feed, loss.rank_feed = enc, feeds.teacher_feed, feeds.rank_feed
    return loss


def _recipe(arch: str, size: int, enc: Encoding, config: DistillOptions, loss: DistillLoss, feeds: _Feeds,
            notes: list[str]) -> dict[str, Any]:
    """recipe.json: what the student learns from, and how (the loss formula, the teacher inputs)."""
    return {"student": arch, "size": size, "encoding": enc.to_dict(), "methods": list(config.method),
            "loss": loss.to_dict(), "teacher": feeds.teacher.describe() if feeds.teacher else None,
            "rank_teacher": feeds.rank_info, "teacher_inputs": feeds.input_kind(), "view_size": feeds.view_size,
            "warnings": notes}


# --------------------------------------------------------------------------- scoring
def _score(out_dir: Path, store, rows: _Rows, feeds: _Feeds, options: TrainOptions,
           progress: ProgressFn | None, seen: Seen) -> dict[str, Any]:
    """best.pt next to its teacher on the test split (val when there is none): student and
    teacher metrics, their agreement, speed and size. The student's scores go into best.pt's
    spec too, and the predictions (with the teacher's ages) into <split>_predictions.csv."""
    eval_idx, eval_split = (rows.test, "test") if len(rows.test) else (rows.val, "val")
    model, spec, device = load_best(out_dir, options)
    metrics: dict[str, Any] = {"split": eval_split}
    if len(eval_idx):
        frame = predict_rows(model, spec, store, eval_idx, device, options, progress)
        metrics["student"] = score(frame)
        if feeds.teacher is not None:
            t_out = (feeds.table.lookup(torch.from_numpy(eval_idx)) if feeds.table is not None and len(rows.test)
                     else teacher_on(feeds.teacher, store, eval_idx, feeds.device, progress))
            t_age = t_out.age.numpy()
            frame["teacher_age"] = t_age
            metrics["teacher"] = age_metrics(t_age, frame["age"].to_numpy(), frame["age_std"].to_numpy())
            metrics["agreement_mae"] = float(np.abs(frame["age_pred"].to_numpy() - t_age).mean())
        write_csv(out_dir / f"{eval_split}_predictions.csv", frame)
    metrics["speed"] = _speed(model, spec, feeds.teacher, device)
    metrics["student_parameters"] = count_parameters(model)
    update_best(out_dir, model, spec, {eval_split: metrics.get("student"), "teacher": metrics.get("teacher"),
                                       "agreement_mae": metrics.get("agreement_mae")}, seen)
    return metrics


def _write_metrics(out_dir: Path, val: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json in the schema train writes too, plus distill's own keys: the teacher's
    metrics on the same faces (with their split), the student-teacher agreement (MAE between
    their predictions, years), the speed comparison and the student's parameters."""
    split = metrics["split"]
    teacher = {"split": split, **metrics["teacher"]} if "teacher" in metrics else None
    return write_metrics(out_dir, val, metrics.get("student") if split == "test" else None, teacher=teacher,
                         agreement_mae=metrics.get("agreement_mae"), speed=metrics["speed"],
                         parameters=metrics["student_parameters"])


def _speed(model: torch.nn.Module, spec, teacher: Teacher | None, device: str, batch: int = 32,
           reps: int = 5) -> dict[str, Any]:
    """Median ms per face of student and teacher on `device` (batch 32, after warm-up): the speed ratio."""
    def ms_per_face(fn) -> float:
        return time_call(fn, device=device, warmup=2, repeats=reps, clock="perf_counter")["median_ms"] / batch

    gen = torch.Generator().manual_seed(0)
    x01 = torch.rand(batch, 3, spec.input_size, spec.input_size, generator=gen)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    x = ((x01 - mean) / std).to(device)
    with torch.inference_mode():
        out = {"batch": batch, "threads": torch.get_num_threads(), "device": device,
               "student_ms_per_face": ms_per_face(lambda: model(x))}
        if teacher is not None:
            xt = torch.rand(batch, 3, teacher.input_size, teacher.input_size, generator=gen).to(device)
            out["teacher_ms_per_face"] = ms_per_face(lambda: teacher(xt))
            out["speedup"] = out["teacher_ms_per_face"] / max(out["student_ms_per_face"], 1e-9)
    return out
