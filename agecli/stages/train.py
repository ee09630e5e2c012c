"""Training: one plain loop (`fit`) shared by `train` and `distill`, and the train stage.

    fit(model, spec, store, train_idx, val_idx, out_dir, options, loss_fn=None)
        seeded AdamW/SGD, cosine schedule with linear warm-up, augmentation on tensors,
        AMP + channels_last on CUDA, optional torch.compile, gradient clipping,
        validation every epoch (MAE picks best.pt and drives early stopping),
        history.csv + learning_curve.png + best.pt + last.pt (resumable) in out_dir.

    train(run, arch=..., encoding=..., options=TrainOptions(...))
        the `agecli train` stage: builds the model and its ModelSpec from the run's face
        store, fits it in RUN/train/<name>/ and scores best.pt on the test split.

    cross_validate(run, arch=..., ...)
        one model per official fold (Adience), per-fold and mean +- std metrics.

Distributed data parallel comes for free under `torchrun` (see agecli.distributed).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from agecli.engine import distributed
from agecli.modeling.checkpoint import ModelSpec, load_state, save_checkpoint
from agecli.data.batches import Augment, Batch, Batches, normalise, resize, to_input, to_unit
from agecli.modeling.encodings import build_encoding
from agecli.errors import AgecliError
from agecli.stages.evaluate import predict_store, score
from agecli.modeling.backbones import BACKBONES, AgeModel, build_model, count_parameters, default_normalisation, resolve_arch
from agecli.progress import ProgressFn
from agecli.options import TrainOptions
from agecli.rundir import Stage, resolve_run, unique_name, write_csv, write_json
from agecli.store import FaceStore

LossFn = Callable[[dict[str, torch.Tensor], Batch, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
"""(model outputs, batch with labels on the model's device, augmented input x) -> (loss, named parts)."""

MIN_TRAIN_FACES = 16  # fewer labelled training faces than this is a mistake, not an experiment


# --------------------------------------------------------------------------- the loop
def default_loss(encoding, gender: bool) -> LossFn:
    """The encoding's loss on faces with a known age, plus gender cross-entropy where known."""

    def loss_fn(outputs: dict[str, torch.Tensor], batch: Batch, x: torch.Tensor):
        known = ~torch.isnan(batch.age)
        parts: dict[str, float] = {}
        if known.any():
            loss = encoding.loss(outputs["age"][known], batch.age[known], batch.age_std[known])
        else:  # keep the graph connected so DDP's gradient sync still happens
            loss = outputs["age"].sum() * 0.0
        parts["age"] = float(loss.detach())
        if gender and "gender" in outputs:
            g = batch.gender
            if (g >= 0).any():
                g_loss = F.cross_entropy(outputs["gender"].float(), g, ignore_index=-1)
                parts["gender"] = float(g_loss.detach())
                loss = loss + g_loss
        return loss, parts

    return loss_fn


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    groups = _param_groups(model, options.weight_decay)
    if options.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=options.lr)
    if options.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=options.lr, momentum=0.9, nesterov=True)
    raise AgecliError(f"unknown optimizer {options.optimizer!r}; choose adamw or sgd.")


class CosineSchedule:
    """Per-step LR multiplier: linear warm-up from 1% to 100%, then cosine down to 1%.

    A callable object rather than a closure so that LambdaLR saves its state (total and warm-up
    steps) in last.pt, and so that `set_total` can end the cosine earlier under a time limit."""

    def __init__(self, total: int, warmup: int):
        self.total, self.warmup = max(1, total), min(max(1, total) - 1, warmup)

    def set_total(self, total: int) -> None:
        self.total = max(1, total)
        self.warmup = min(self.warmup, self.total - 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return 0.01 + 0.99 * step / max(1, self.warmup)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, options: TrainOptions, steps_per_epoch: int):
    schedule = CosineSchedule(options.epochs * steps_per_epoch, int(round(options.warmup_epochs * steps_per_epoch)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def epochs_within(limit_s: float, walls: list[float], planned: int) -> int:
    """How many epochs fit in a time limit, given the wall seconds of those done so far.

    The first epoch pays for warm-up (cuDNN autotuning, caches), so the mean of the last few
    after it predicts the rest; from the first alone we only stop if one more would not fit.
    Never more than `planned`, never fewer than the epochs done."""
    done, left = len(walls), limit_s - sum(walls)
    if done == 1:
        return done if left < walls[0] else planned
    recent = walls[1:][-3:]
    per_epoch = 1.05 * sum(recent) / len(recent)
    return max(done, min(planned, done + int(left // per_epoch)))


def _to_device(batch: Batch, device: str) -> Batch:
    return Batch(batch.images, batch.age.to(device, non_blocking=True), batch.age_std.to(device, non_blocking=True),
                 batch.gender.to(device, non_blocking=True), batch.index)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "augment": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fit(model: AgeModel, spec: ModelSpec, store: FaceStore, train_idx, val_idx, out_dir: Path,
        options: TrainOptions, loss_fn: LossFn | None = None, progress: ProgressFn | None = None,
        view_size: int | None = None, views: Any = None) -> dict[str, Any]:
    """Train `model` on store rows `train_idx`, validating on `val_idx` every epoch.

    `view_size` (above the model's input size): augment at that size, hand the [0, 1] crop to
    `loss_fn` as `batch.view` (a larger teacher sees the same crop at its resolution) and feed
    the model that crop downsized. `views` (an object with `draw(rows, generator) -> (view ids,
    draw_augment numbers)`, e.g. distill.TeacherViews): augment each face as one of a fixed set of
    crops and hand its id to `loss_fn` as `batch.view_id`. Under `options.time_limit` the schedule is shortened after
    each epoch so that training ends in time, still finishing its cosine.

    Writes into out_dir (rank 0 only): history.csv, learning_curve.png, best.pt (lowest val
    MAE; `spec.metrics` holds its val metrics) and last.pt (with the training state, so
    `options.resume` continues exactly). Returns a results dict.
    """
    out_dir = Path(out_dir)
    world, device = distributed.setup(options.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AgecliError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu.")
    if options.threads:
        torch.set_num_threads(options.threads)
    if options.epochs < 1 or options.batch_size < 2 or not options.lr > 0:
        raise AgecliError(f"need epochs >= 1, batch size >= 2 and lr > 0 (got {options.epochs}, "
                          f"{options.batch_size}, {options.lr}).")
    if options.time_limit is not None and not options.time_limit > 0:
        raise AgecliError(f"--time-limit is in minutes and must be positive (got {options.time_limit}).")
    train_idx = np.asarray(train_idx, dtype=np.int64)
    val_idx = np.asarray(val_idx, dtype=np.int64)
    if len(train_idx) == 0:
        raise AgecliError("the training split is empty; check the run's splits (`agecli prepare --val ...`).")
    on_cuda = device.startswith("cuda")
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed + 1000 * world.rank)
    encoding = spec.build_encoding()
    loss_fn = loss_fn or default_loss(encoding, spec.gender)

    batch_size = min(options.batch_size, max(2, len(train_idx) // world.world_size))
    train_batches = Batches(store, train_idx, batch_size, shuffle=True, seed=options.seed, drop_last=True,
                            rank=world.rank, world_size=world.world_size, prefetch=options.workers)
    steps = len(train_batches) if options.max_batches is None else min(len(train_batches), options.max_batches)
    if steps == 0:
        raise AgecliError(f"{len(train_idx)} training faces make no full batch of {batch_size}; lower --batch-size.")

    model = model.to(device)
    if on_cuda and options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, options)
    scheduler = make_scheduler(optimizer, options, steps)
    amp_dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float16
    use_amp = options.amp and on_cuda
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    augment = Augment() if options.augment else None
    view_size = view_size if view_size and augment is not None and view_size > spec.input_size else None
    schedule: CosineSchedule = scheduler.lr_lambdas[0]

    history: list[dict[str, Any]] = []
    start_epoch, best_mae, best_epoch, stale = 1, math.inf, 0, 0
    walls: list[float] = []                         # wall seconds of each epoch, for time_limit
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if options.resume and last_path.exists():
        state = _load_training_state(last_path, model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], generator)
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        best_mae, best_epoch, stale = float(state["best_mae"]), int(state["best_epoch"]), int(state["stale"])
        spec.metrics = dict(state.get("best_metrics", {}))
        walls = list(state.get("walls", []))
        if isinstance(loss_fn, torch.nn.Module) and state.get("loss_state"):
            loss_fn.load_state_dict(state["loss_state"])
        # a resumed run follows this call's --epochs (as before), within a limit's earlier cut
        wanted = options.epochs * steps
        schedule.set_total(min(schedule.total, wanted) if options.time_limit else wanted)

    net: torch.nn.Module = model
    if options.compile:
        net = torch.compile(net)
    if world.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[torch.device(device).index] if on_cuda else None)

    started = time.perf_counter()
    images_seen, train_seconds = 0, 0.0
    epoch = start_epoch - 1
    stopped_early = False
    planned = math.ceil(schedule.total / steps)   # epochs; shorter than options.epochs after a time-limit cut
    while epoch < planned:
        epoch += 1
        epoch_started = time.perf_counter()
        net.train()
        train_batches.set_epoch(epoch)
        totals: dict[str, float] = {}
        seen = 0
        t0 = time.perf_counter()
        for step, batch in enumerate(train_batches):
            if step >= steps:
                break
            batch = _to_device(batch, device)
            if views is not None and augment is not None:
                view_id, params = views.draw(batch.index, generator)
                batch = replace(batch, view_id=view_id)
                x = to_input(batch.images, spec.input_size, spec.mean, spec.std, device=device, params=params,
                             channels_last=on_cuda and options.channels_last)
            elif view_size:
                view = to_unit(batch.images, view_size, device=device, augment=augment, generator=generator)
                batch = replace(batch, view=view)
                x = normalise(resize(view, spec.input_size), spec.mean, spec.std,
                              channels_last=on_cuda and options.channels_last)
            else:
                x = to_input(batch.images, spec.input_size, spec.mean, spec.std, device=device, augment=augment,
                             generator=generator, channels_last=on_cuda and options.channels_last)
            try:
                with torch.autocast("cuda", dtype=amp_dtype, enabled=use_amp):
                    outputs = net(x)
                    loss, parts = loss_fn(outputs, batch, x)
                if not torch.isfinite(loss):
                    good = f"the last good checkpoint is {last_path} (epoch {epoch - 1})" if last_path.exists() \
                        else "no checkpoint was written yet"
                    raise AgecliError(
                        f"the loss became {float(loss.detach())} at epoch {epoch}, batch {step + 1}/{steps}; {good}. "
                        f"Lower --lr (now {options.lr:g}), keep gradient clipping on, or check the labels.")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if options.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad)
                scaler.step(optimizer)
                scaler.update()
            except torch.OutOfMemoryError:
                raise AgecliError(
                    f"out of memory on {device} at epoch {epoch}, batch {step + 1} (batch size {batch_size}, "
                    f"input {spec.input_size}px). Lower --batch-size or --size, or keep --amp on.") from None
            scheduler.step()
            n = len(batch)
            seen += n
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) * n
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value * n
            if progress:
                progress(f"epoch {epoch}/{planned}", step + 1, steps)
        if on_cuda:
            torch.cuda.synchronize()
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        images_seen += seen * world.world_size
        row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        for key, value in totals.items():
            row[f"train_{key}"] = distributed.all_mean(value / max(1, seen), world, device if on_cuda else "cpu")
        row["train_images_per_s"] = seen * world.world_size / max(epoch_seconds, 1e-9)

        recalibrate_batchnorm(model, store, train_idx, spec, device, options.precise_bn_batches,
                              options.val_batch_size)
        metrics: dict[str, Any] = {}
        if world.main and len(val_idx):
            frame = predict_store(model, spec, store, val_idx, device=device, batch_size=options.val_batch_size)
            metrics = score(frame)
            row.update({f"val_{k}": v for k, v in metrics.items() if k in ("mae", "rmse", "cs5", "epsilon_error",
                                                                               "group_exact", "group_1off",
                                                                               "gender_accuracy")})
        row["seconds"] = epoch_seconds
        history.append(row)
        walls.append(time.perf_counter() - epoch_started)
        if options.time_limit is not None and epoch < planned:
            # rank 0 decides: ranks that disagreed on the epoch count would wait on each other
            fits = distributed.broadcast(epochs_within(options.time_limit * 60, walls, planned), world)
            if fits < planned:
                planned = fits
                schedule.set_total(planned * steps)
                row["planned_epochs"] = planned
        val_mae = metrics.get("mae", math.nan) if metrics else math.nan
        improved = bool(metrics) and (val_mae < best_mae or not math.isfinite(best_mae))
        if not len(val_idx):  # nothing to select on: the newest model is the best we know
            improved = True
        if improved:
            best_mae, best_epoch, stale = (val_mae if metrics else math.inf), epoch, 0
        else:
            stale += 1
        if world.main:
            if improved:
                spec.metrics = {"split": "val", "epoch": epoch, **metrics}
                save_checkpoint(best_path, model, spec)
            state = {
                "epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": _rng_state(generator), "history": history,
                "best_mae": best_mae, "best_epoch": best_epoch, "stale": stale, "best_metrics": spec.metrics,
                "options": options.to_dict(), "walls": walls,
                # a loss with learned parts (distill's hint adapters) resumes with them
                "loss_state": loss_fn.state_dict() if isinstance(loss_fn, torch.nn.Module) else None,
            }
            save_checkpoint(last_path, model, replace(spec, metrics={"split": "val", "epoch": epoch, **metrics}),
                            training_state=state)
            write_csv(out_dir / "history.csv", pd.DataFrame(history))
            plot_history(history, out_dir / "learning_curve.png")
        stop = options.patience is not None and stale >= options.patience
        if distributed.broadcast(stop, world):
            stopped_early = True
            break
    distributed.barrier(world)
    if world.distributed:  # ranks > 0 never validated: take rank 0's record of the best epoch
        best_epoch, best_mae = distributed.broadcast((best_epoch, best_mae), world)
    return {
        "best_epoch": best_epoch,
        "epochs_run": epoch - start_epoch + 1 if epoch >= start_epoch else 0,
        "last_epoch": epoch,
        "stopped_early": stopped_early,
        "planned_epochs": planned,
        "val": spec.metrics,
        "seconds": time.perf_counter() - started,
        "train_images_per_s": images_seen / train_seconds if train_seconds else None,
        "train_faces": int(len(train_idx)),
        "val_faces": int(len(val_idx)),
        "batch_size": batch_size,
        "world_size": world.world_size,
        "device": device,
        "best": str(best_path),
        "last": str(last_path),
    }


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, store: FaceStore, indices, spec: ModelSpec, device: str,
                          max_batches: int, batch_size: int) -> None:
    """Recompute BatchNorm running statistics as a plain average over un-augmented training
    faces ("precise BN"). The exponential running average lags the weights while they
    change fast (from scratch, short schedules, tiny data), and eval-mode predictions then
    collapse towards a constant; a few forward passes fix that at no cost in accuracy."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or max_batches <= 0:
        return
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = model.training
    model.train()
    rows = np.asarray(indices, dtype=np.int64)
    rows = rows[np.linspace(0, len(rows) - 1, num=min(len(rows), max_batches * batch_size)).astype(np.int64)]
    for batch in Batches(store, np.unique(rows), batch_size, prefetch=0):
        if len(batch) < 2:
            continue
        model(to_input(batch.images, spec.input_size, spec.mean, spec.std, device=device))
    for m, (momentum, _) in zip(norms, saved):
        m.momentum = momentum
    model.train(was_training)


def _load_training_state(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    from agecli.modeling.checkpoint import read_checkpoint

    payload = read_checkpoint(path)
    if "training_state" not in payload:
        raise AgecliError(f"{path} holds no training state, so it cannot be resumed; start a new run without --resume.")
    load_state(model, payload["state_dict"], source=str(path))
    return payload["training_state"]


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Learning curve: training loss and validation MAE per epoch (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agecli.rundir import atomic_path

    frame = pd.DataFrame(history)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(frame["epoch"], frame["train_loss"], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    if "val_mae" in frame:
        ax2 = ax.twinx()
        ax2.plot(frame["epoch"], frame["val_mae"], "s-", color="tab:red", label="val MAE")
        ax2.set_ylabel("val MAE (years)", color="tab:red")
    ax.set_title("learning curve")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------- the train stage
def labelled(store: FaceStore, indices) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64)
    ages = store.records["age"].to_numpy()
    return indices[~np.isnan(ages[indices])]


def load_init(model: AgeModel, path: str | Path) -> dict[str, Any]:
    """Start from an agecli checkpoint or a plain state dict; heads that differ are left as built."""
    path = Path(path)
    if not path.exists():
        raise AgecliError(f"--init {path} does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AgecliError(f"--init {path} could not be loaded safely (weights_only=True): "
                          f"{str(exc).splitlines()[0]}. Give an agecli checkpoint or a saved state dict.") from None
    source = "agecli checkpoint"
    if isinstance(payload, dict) and payload.get("format") == "agecli.checkpoint":
        state = payload["state_dict"]
    elif isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        state, source = payload["state_dict"], "state dict"
    elif isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        state, source = payload["model"], "state dict"
    elif isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        state, source = payload, "state dict"
    else:
        raise AgecliError(f"--init {path} is neither an agecli checkpoint nor a state dict of tensors.")
    own = model.state_dict()
    if not any(k in own for k in state):  # a bare torchvision state dict: keys lack "backbone."
        prefixed = {f"backbone.{k}": v for k, v in state.items()}
        if any(k in own for k in prefixed):
            state = prefixed
    skipped = load_state(model, state, source=f"--init {path}", strict=False)
    loaded = [k for k in state if k in own and k not in skipped]
    backbone_keys = [k for k in own if k.startswith("backbone.")]
    backbone_loaded = sum(1 for k in loaded if k.startswith("backbone."))
    if backbone_loaded < 0.5 * len(backbone_keys):
        shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in skipped if k in own][:3]
        raise AgecliError(
            f"--init {path} does not fit {model.__class__.__name__} with this --arch: only {backbone_loaded} of "
            f"{len(backbone_keys)} backbone tensors match"
            + (" (e.g. " + "; ".join(shape) + ")" if shape else "") + ". Use the same --arch the weights were trained with.")
    return {"init": str(path), "kind": source, "loaded": len(loaded), "skipped": skipped}


def _split_counts(store: FaceStore) -> str:
    counts = store.records.groupby("split")["age"].count().to_dict()
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"


def train(run: str | Path | None = None, *, arch: str, name: str | None = None, size: int | None = None,
          encoding: str = "ldae", sigma: float | None = None, decode: str | None = None, loss: str | None = None,
          gender: bool = False, pretrained: str | None = None, init: str | Path | None = None,
          fold: int | None = None, options: TrainOptions | None = None,
          progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train one model on a prepared run; writes RUN/train/<name>/ and returns its results."""
    options = options or TrainOptions()
    world = distributed.from_env()
    run = resolve_run(run)
    store = FaceStore.open(run)
    if not store.has_ages:
        raise AgecliError(f"run {run} has no age labels (dataset {store.dataset!r}, e.g. a `folder` run): there is "
                          "nothing to train on. Prepare a labelled dataset (utkface, adience, ...) or use "
                          "`agecli distill`, which teaches a student on unlabelled faces from a teacher.")
    arch = resolve_arch(arch)
    train_idx = labelled(store, store.indices("train", fold))
    val_idx = labelled(store, store.indices("val", fold))
    test_idx = labelled(store, store.indices("test", fold))
    if len(train_idx) < MIN_TRAIN_FACES:
        raise AgecliError(f"run {run} has only {len(train_idx)} labelled training faces"
                          f"{'' if fold is None else f' outside fold {fold}'} (at least {MIN_TRAIN_FACES} needed; "
                          f"labelled faces per split: {_split_counts(store)}). Prepare more faces (drop --limit).")
    if len(val_idx) == 0:
        raise AgecliError(f"run {run} has no labelled validation faces (labelled faces per split: "
                          f"{_split_counts(store)}); best.pt and early stopping need them. "
                          "Re-run prepare with a validation fraction (--val).")
    if gender and not (store.records["gender"] >= 0).any():
        raise AgecliError(f"--gender asks for a gender head but run {run} has no gender labels; drop --gender.")

    enc_options = {k: v for k, v in (("sigma", sigma), ("decode", decode), ("loss_kind", loss)) if v is not None}
    enc = build_encoding(encoding, **enc_options)
    size = size or min(store.size, BACKBONES[arch].default_size)
    if size > store.size:
        raise AgecliError(f"--size {size} is larger than the run's {store.size}px faces; use --size {store.size} "
                          "or less, or re-prepare with a larger --size.")
    base = name or (arch if fold is None else f"{arch}-fold{fold}")
    parent = run / "train"
    if options.resume:
        if not (parent / base / "last.pt").exists():
            raise AgecliError(f"--resume: {parent / base / 'last.pt'} does not exist; nothing to resume "
                              f"(runs here: {sorted(p.name for p in parent.glob('*')) if parent.is_dir() else 'none'}).")
        name = base
    else:
        name = distributed.broadcast(unique_name(parent, base) if world.main else None, world)

    mean, std = default_normalisation(arch)  # what the backbone's pretrained weights expect
    torch.manual_seed(options.seed)  # the same seed builds the same initial head
    model = build_model(arch, enc, gender=gender, pretrained=pretrained)
    init_info = load_init(model, init) if init else None
    args = {"arch": arch, "name": name, "size": size, "encoding": enc.to_dict(), "gender": gender,
            "pretrained": pretrained, "init": str(init) if init else None, "fold": fold, "options": options.to_dict()}
    spec = ModelSpec(
        arch=arch, encoding=enc.to_dict(), input_size=size, gender=gender, mean=mean, std=std,
        alignment=store.manifest.get("alignment", store.alignment.to_dict()),
        label_space=store.manifest.get("label_space", "ages 0-100"),
        data_fingerprint=store.fingerprint(),
        provenance={"stage": "train", "run": str(run), "name": name, "dataset": store.dataset, "args": args,
                    "init": init_info and {k: v for k, v in init_info.items() if k != "skipped"}},
    )
    inputs = {"prepare": spec.data_fingerprint}
    out_dir = parent / name
    with (Stage(run, "train", name, args=args, inputs=inputs) if world.main else contextlib.nullcontext()) as stage:
        results = fit(model, spec, store, train_idx, val_idx, out_dir, options, progress=progress)
        results.update({"run": str(run), "name": name, "dir": str(out_dir), "arch": arch, "input_size": size,
                        "encoding": enc.to_dict(), "parameters": count_parameters(model), "init": init_info})
        if world.main:
            if len(test_idx):
                results["test"] = _score_best(out_dir / "best.pt", store, test_idx, options, out_dir, progress)
            write_json(out_dir / "metrics.json", {"val": results["val"], "test": results.get("test")})
            stage.complete(results={k: v for k, v in results.items() if k != "init"})
    return results


def _score_best(best: Path, store: FaceStore, test_idx, options: TrainOptions, out_dir: Path,
                progress: ProgressFn | None) -> dict[str, Any]:
    """Score best.pt on the test split; the metrics go into the checkpoint's spec as well."""
    from agecli.modeling.checkpoint import load_checkpoint, read_checkpoint

    device = distributed.setup(options.device)[1]
    model, spec = load_checkpoint(best, device)
    frame = predict_store(model, spec, store, test_idx, device=device, batch_size=options.val_batch_size,
                          progress=progress)
    metrics = score(frame)
    write_csv(out_dir / "test_predictions.csv", frame)
    payload = read_checkpoint(best)
    spec.metrics = {**spec.metrics, "test": metrics}
    save_checkpoint(best, model, spec, training_state=payload.get("training_state"))
    return metrics


def cross_validate(run: str | Path | None = None, *, arch: str, name: str | None = None,
                   folds: list[int] | None = None, progress: ProgressFn | None = None,
                   **kwargs: Any) -> dict[str, Any]:
    """One model per cross-validation fold (Adience's 5 official folds): per-fold and mean +- std metrics."""
    run = resolve_run(run)
    store = FaceStore.open(run)
    available = store.folds()
    folds = folds if folds is not None else available
    if len(available) < 2:
        raise AgecliError(f"run {run} has no cross-validation folds (dataset {store.dataset!r}); --cv needs a "
                          "dataset with official folds such as adience. Train without --cv.")
    missing = sorted(set(folds) - set(available))
    if missing:
        raise AgecliError(f"folds {missing} are not in run {run} (its folds: {available}).")
    arch = resolve_arch(arch)
    base = name or arch
    per_fold = []
    for fold in folds:
        result = train(run, arch=arch, name=f"{base}-fold{fold}", fold=fold, progress=progress, **kwargs)
        per_fold.append({"fold": fold, "name": result["name"], **(result.get("test") or {})})
    frame = pd.DataFrame(per_fold)
    summary: dict[str, Any] = {"folds": per_fold}
    for key in ("group_exact", "group_1off", "mae", "gender_accuracy"):
        if key in frame:
            values = frame[key].dropna().to_numpy(dtype=float)
            if len(values):
                summary[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    if distributed.from_env().main:
        cv_name = unique_name(run / "train", f"{base}-cv")
        with Stage(run, "train", cv_name, args={"arch": arch, "folds": folds, **{k: str(v) for k, v in kwargs.items()}}) as stage:
            write_csv(stage.path("folds.csv"), frame)
            write_json(stage.path("cv.json"), summary)
            stage.complete(results=summary)
        summary["dir"] = str(stage.dir)
    return summary
