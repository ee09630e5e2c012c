"""The training loop every model of agecli is trained with.

    fit(model, spec, store, train_idx, val_idx, out_dir, options, loss_fn=None, make_input=None)
        seeded AdamW/SGD, cosine schedule with linear warm-up, augmentation on tensors
        (plus noise/blur/JPEG degradation under options.robust_augment, training only),
        AMP + channels_last on CUDA, optional torch.compile, gradient clipping, validation
        every epoch (val MAE, or the metric a `Monitor` names, picks best.pt and drives early
        stopping; `validate_fn` can measure something else), history.csv +
        learning_curve.png + best.pt + last.pt (resumable) in out_dir, a time budget.

Its parts, each usable alone: `train_one_epoch` (the steps of one epoch), `validate` (score
on the validation split), `agecli.engine.checkpointer.Checkpointer` (best/last/history and
resume) and `agecli.engine.optim.TimeBudget`. A stage changes what the model learns through
`loss_fn` and what it sees through `make_input` (distillation hands its teacher the very
crop the student sees that way); the loop itself knows nothing about teachers.

Distributed data parallel comes for free under `torchrun` (see agecli.engine.distributed).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from agecli.data.batches import Augment, Batch, Batches, degrade, normalise, to_input, to_unit
from agecli.device import require_device
from agecli.engine import distributed
from agecli.engine.averaging import WeightAverage
from agecli.engine.checkpointer import Checkpointer, Monitor, Stateful, rng_state, set_rng_state
from agecli.engine.inference import predict_store
from agecli.engine.metrics import score
from agecli.engine.optim import TimeBudget, make_optimizer, make_scheduler
from agecli.errors import AgecliError
from agecli.modeling.checkpoint import ModelSpec, Seen
from agecli.modeling.encodings import Encoding
from agecli.options import TrainOptions
from agecli.progress import ProgressFn
from agecli.store import FaceStore

LossFn = Callable[[dict[str, torch.Tensor], Batch, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
"""(model outputs, batch with labels on the model's device, augmented input x) -> (loss, named parts)."""

VAL_COLUMNS = ("mae", "rmse", "cs5", "epsilon_error", "group_exact", "group_1off", "gender_accuracy")


# --------------------------------------------------------------------------- inputs and losses
@dataclass(frozen=True)
class Preprocess:
    """How a batch's uint8 faces become the model's input: its size and normalisation, the
    device, the training augmentation (None: none) and the share of faces it also degrades
    (options.robust_augment, `agecli.data.batches.degrade`; 0: none)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: str
    augment: Augment | None
    channels_last: bool
    robust: float = 0.0


InputFn = Callable[[Batch, torch.Generator, Preprocess], tuple[Batch, torch.Tensor]]
"""(batch, augmentation generator, preprocessing) -> (the batch, told what its loss needs to
know about the input, and the model's input x)."""


def plain_input(batch: Batch, generator: torch.Generator, prep: Preprocess) -> tuple[Batch, torch.Tensor]:
    """The default input function: the faces resized, augmented, degraded if asked and normalised."""
    x01 = to_unit(batch.images, prep.size, device=prep.device, augment=prep.augment, generator=generator)
    return finish_input(batch, x01, generator, prep)


def finish_input(batch: Batch, x01: torch.Tensor, generator: torch.Generator,
                 prep: Preprocess) -> tuple[Batch, torch.Tensor]:
    """The augmented [0, 1] crop at the model's size -> the model's input: a `prep.robust`
    share of faces degraded (`batch.degraded` says which), then normalised. Input functions
    end here so that the degradation, drawn after the crop, reaches every kind of input."""
    x01, degraded = degrade(x01, prep.robust, generator)
    if degraded is not None:
        batch = replace(batch, degraded=degraded)
    return batch, normalise(x01, prep.mean, prep.std, channels_last=prep.channels_last)


def ground_truth_loss(outputs: dict[str, torch.Tensor], batch: Batch, encoding: Encoding,
                      gender: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """The encoding's loss on faces with a known age, plus gender cross-entropy where known."""
    known = ~torch.isnan(batch.age)
    parts: dict[str, float] = {}
    if known.any():
        loss = encoding.loss(outputs["age"][known], batch.age[known], batch.age_std[known])
    else:  # keep the graph connected so DDP's gradient sync still happens
        loss = outputs["age"].sum() * 0.0
    parts["age"] = float(loss.detach())
    if gender and "gender" in outputs and (batch.gender >= 0).any():
        g_loss = F.cross_entropy(outputs["gender"].float(), batch.gender, ignore_index=-1)
        parts["gender"] = float(g_loss.detach())
        loss = loss + g_loss
    return loss, parts


def default_loss(encoding: Encoding, gender: bool) -> LossFn:
    """`ground_truth_loss` as a loss function of `fit`: what the train stage optimises."""
    return lambda outputs, batch, x: ground_truth_loss(outputs, batch, encoding, gender)


# --------------------------------------------------------------------------- one step, one epoch
@dataclass
class Stepper:
    """One optimisation step: forward and loss (under autocast), backward, clipping, update."""

    net: torch.nn.Module            # what runs forward (the model, compiled or wrapped for DDP)
    params: Callable[[], Any]       # the parameters whose gradient norm is clipped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype
    use_amp: bool
    clip_grad: float | None
    average: WeightAverage | None = None   # options.ema: updated after every step

    def __call__(self, x: torch.Tensor, batch: Batch, loss_fn: LossFn) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.use_amp):
            outputs = self.net(x)
            loss, parts = loss_fn(outputs, batch, x)
        if not torch.isfinite(loss):
            raise FloatingPointError(float(loss.detach()))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.average is not None:
            self.average.update()
        return loss, parts


@dataclass
class EpochPlan:
    """What one epoch of training draws on besides the step itself."""

    batches: Batches
    steps: int                      # batches per epoch (at most options.max_batches)
    prep: Preprocess
    generator: torch.Generator      # the augmentation's random numbers
    loss_fn: LossFn
    make_input: InputFn


class StepFailed(Exception):
    """A training step failed at 1-based `batch`: the loss was `loss` (not finite), or, with
    loss None, the device ran out of memory. `fit` turns it into an AgecliError that says
    what to change."""

    def __init__(self, batch: int, loss: float | None):
        super().__init__(batch, loss)
        self.batch, self.loss = batch, loss


def to_device(batch: Batch, device: str) -> Batch:
    """The batch's labels on `device` (the images stay on the CPU until preprocessing)."""
    return Batch(batch.images, batch.age.to(device, non_blocking=True), batch.age_std.to(device, non_blocking=True),
                 batch.gender.to(device, non_blocking=True), batch.index)


def train_one_epoch(step: Stepper, plan: EpochPlan, epoch: int, label: str,
                    progress: ProgressFn | None = None) -> tuple[dict[str, float], int]:
    """Train for one epoch; returns the loss parts summed over faces, and the faces seen.
    A non-finite loss or running out of memory raises `StepFailed`."""
    step.net.train()
    plan.batches.set_epoch(epoch)
    totals: dict[str, float] = {}
    seen = 0
    for i, batch in enumerate(plan.batches):
        if i >= plan.steps:
            break
        batch, x = plan.make_input(to_device(batch, plan.prep.device), plan.generator, plan.prep)
        try:
            loss, parts = step(x, batch, plan.loss_fn)
        except FloatingPointError as exc:
            raise StepFailed(i + 1, exc.args[0]) from None
        except torch.OutOfMemoryError:
            raise StepFailed(i + 1, None) from None
        step.scheduler.step()
        n = len(batch)
        seen += n
        totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) * n
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value * n
        if progress:
            progress(label, i + 1, plan.steps)
    return totals, seen


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


def validate(model: torch.nn.Module, spec: ModelSpec, store: FaceStore, val_idx, device: str,
             batch_size: int) -> dict[str, Any]:
    """The model's metrics on the validation rows (`agecli.engine.metrics.score`)."""
    return score(predict_store(model, spec, store, val_idx, device=device, batch_size=batch_size))


ValidateFn = Callable[[torch.nn.Module, ModelSpec, FaceStore, np.ndarray, str, int], dict[str, Any]]
"""(model, spec, store, val rows, device, batch size) -> val metrics, as `validate`; the
`Monitor` given to `fit` names the one that picks best.pt."""


# --------------------------------------------------------------------------- the loop
@dataclass
class _Run:
    """Everything one call of `fit` works with."""

    model: torch.nn.Module
    spec: ModelSpec
    store: FaceStore
    train_idx: np.ndarray
    val_idx: np.ndarray
    options: TrainOptions
    world: distributed.World
    step: Stepper
    plan: EpochPlan
    checkpointer: Checkpointer
    budget: TimeBudget
    images_seen: int = 0
    train_seconds: float = 0.0
    validate_fn: ValidateFn = validate

    @property
    def device(self) -> str:
        return self.plan.prep.device


def fit(model: torch.nn.Module, spec: ModelSpec, store: FaceStore, train_idx, val_idx, out_dir: Path,
        options: TrainOptions, loss_fn: LossFn | None = None, progress: ProgressFn | None = None, *,
        make_input: InputFn | None = None, extra_state: dict[str, Stateful] | None = None,
        validate_fn: ValidateFn = validate, monitor: Monitor | None = None, seen: Seen | None = None) -> dict[str, Any]:
    """Train `model` on store rows `train_idx`, validating on `val_idx` every epoch.

    `loss_fn` (default: the encoding's loss, plus gender where the spec has a head) gets the
    model's outputs, the batch and the input; `make_input` (default `plain_input`) turns each
    batch into the model's input and may hand the loss what it needs to know about it.
    `extra_state`: objects whose state last.pt must carry for `options.resume` (a loss with
    learned parts). `validate_fn` (default `validate`) measures the model on `val_idx` and
    `monitor` (default: lowest "mae") names the metric that picks best.pt and drives early
    stopping. Under `options.time_limit` the schedule is shortened after each epoch so
    that training ends in time, still finishing its cosine.

    Writes into out_dir (rank 0 only): history.csv, learning_curve.png, best.pt (best
    monitored value; `spec.metrics` holds its val metrics) and last.pt (with the training
    state, so `options.resume` continues exactly); both carry `seen`, what the model learned
    from (`Seen`). Returns a results dict.
    """
    world, device = distributed.setup(require_device(options.device))
    if options.threads:
        torch.set_num_threads(options.threads)
    train_idx = np.asarray(train_idx, dtype=np.int64)
    val_idx = np.asarray(val_idx, dtype=np.int64)
    if len(train_idx) == 0:
        raise AgecliError("the training split is empty; check the run's splits (`agecli prepare --val ...`).")
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed + 1000 * world.rank)
    loss_fn = loss_fn or default_loss(spec.build_encoding(), spec.gender)
    batches, steps = _train_batches(store, train_idx, options, world)
    on_cuda = device.startswith("cuda")
    model = model.to(device)
    if on_cuda and options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step = _stepper(model, options, on_cuda, steps)
    budget = TimeBudget(options.time_limit, step.scheduler.lr_lambdas[0], steps)
    if step.average is not None:   # last.pt carries the average, so a resumed run continues it
        extra_state = {**(extra_state or {}), "weight_average": step.average}
    checkpointer = Checkpointer(out_dir, model, spec, options, extra_state, monitor, seen)
    start_epoch = 1
    if options.resume and checkpointer.last_path.exists():
        start_epoch = _resume(checkpointer, step, generator) + 1
        budget.resume(options.epochs)
    step.net = _wrap(model, options, world, device)
    prep = Preprocess(spec.input_size, spec.mean, spec.std, device, Augment() if options.augment else None,
                      on_cuda and options.channels_last, robust=options.robust_augment)
    run = _Run(model, spec, store, train_idx, val_idx, options, world, step,
               EpochPlan(batches, steps, prep, generator, loss_fn, make_input or plain_input), checkpointer, budget,
               validate_fn=validate_fn)
    started = time.perf_counter()
    epoch, stopped_early = start_epoch - 1, False
    while epoch < budget.planned:
        epoch += 1
        if _epoch(run, epoch, progress):
            stopped_early = True
            break
    distributed.barrier(world)
    if world.distributed:  # ranks > 0 never validated: take rank 0's record of the best epoch
        checkpointer.best_epoch, checkpointer.best_value = distributed.broadcast(
            (checkpointer.best_epoch, checkpointer.best_value), world)
    return _results(run, epoch, start_epoch, stopped_early, time.perf_counter() - started)


def _train_batches(store: FaceStore, train_idx: np.ndarray, options: TrainOptions,
                   world: distributed.World) -> tuple[Batches, int]:
    """The shuffled, sharded training batches and the steps taken from them per epoch."""
    batch_size = min(options.batch_size, max(2, len(train_idx) // world.world_size))
    batches = Batches(store, train_idx, batch_size, shuffle=True, seed=options.seed, drop_last=True,
                      rank=world.rank, world_size=world.world_size, prefetch=options.workers)
    steps = len(batches) if options.max_batches is None else min(len(batches), options.max_batches)
    if steps == 0:
        raise AgecliError(f"{len(train_idx)} training faces make no full batch of {batch_size}; lower --batch-size.")
    return batches, steps


def _stepper(model: torch.nn.Module, options: TrainOptions, on_cuda: bool, steps: int) -> Stepper:
    """Optimiser, schedule and mixed precision (bf16 where the GPU has it, else fp16 with a
    gradient scaler; none on the CPU) for `model`; the stepper runs the model itself until
    `fit` swaps in its compiled / DDP wrapper."""
    optimizer = make_optimizer(model, options)
    scheduler = make_scheduler(optimizer, options, steps)
    amp_dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float16
    use_amp = options.amp and on_cuda
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    average = WeightAverage(model, options.ema) if options.ema else None
    return Stepper(model, model.parameters, optimizer, scheduler, scaler, amp_dtype, use_amp, options.clip_grad,
                   average)


def _resume(checkpointer: Checkpointer, step: Stepper, generator: torch.Generator) -> int:
    """Continue from last.pt: weights, record, optimiser, schedule, scaler and random states.
    Returns the last epoch it finished."""
    state = checkpointer.resume()
    step.optimizer.load_state_dict(state["optimizer"])
    step.scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state:
        step.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], generator)
    return int(state["epoch"])


def _wrap(model: torch.nn.Module, options: TrainOptions, world: distributed.World, device: str) -> torch.nn.Module:
    """What runs forward in training: the model, compiled if asked, inside DDP under torchrun."""
    net: torch.nn.Module = model
    if options.compile:
        net = torch.compile(net)
    if world.distributed:
        on_cuda = device.startswith("cuda")
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[torch.device(device).index] if on_cuda else None)
    return net


def _epoch(run: _Run, epoch: int, progress: ProgressFn | None) -> bool:
    """Train, validate and checkpoint one epoch; True when early stopping ends training."""
    epoch_started = time.perf_counter()
    world, device, options, checkpointer = run.world, run.device, run.options, run.checkpointer
    totals, seen, seconds = _train_timed(run, epoch, progress)
    run.train_seconds += seconds
    run.images_seen += seen * world.world_size
    row: dict[str, Any] = {"epoch": epoch, "lr": max(group["lr"] for group in run.step.optimizer.param_groups)}
    for key, value in totals.items():
        row[f"train_{key}"] = distributed.all_mean(value / max(1, seen), world,
                                                   device if device.startswith("cuda") else "cpu")
    row["train_images_per_s"] = seen * world.world_size / max(seconds, 1e-9)
    metrics: dict[str, Any] = {}
    with _validated_weights(run):   # under options.ema, the average is what is measured and kept as best.pt
        recalibrate_batchnorm(run.model, run.store, run.train_idx, run.spec, device, options.precise_bn_batches,
                              options.val_batch_size)
        if world.main and len(run.val_idx):
            metrics = run.validate_fn(run.model, run.spec, run.store, run.val_idx, device, options.val_batch_size)
        improved = checkpointer.improved(epoch, metrics, has_val=len(run.val_idx) > 0)
        if world.main and improved:
            checkpointer.save_best(epoch, metrics)
    row.update({f"val_{k}": v for k, v in metrics.items() if k in VAL_COLUMNS or k == checkpointer.monitor.key})
    row["seconds"] = seconds
    checkpointer.history.append(row)
    checkpointer.walls.append(time.perf_counter() - epoch_started)
    cut = run.budget.replan(epoch, checkpointer.walls, world)
    if cut is not None:
        row["planned_epochs"] = cut
    if world.main:
        step = run.step
        checkpointer.save_last(epoch, metrics, {
            "optimizer": step.optimizer.state_dict(), "scheduler": step.scheduler.state_dict(),
            "scaler": step.scaler.state_dict(), "rng": rng_state(run.plan.generator)})
    return distributed.broadcast(checkpointer.should_stop(), world)


def _validated_weights(run: _Run) -> contextlib.AbstractContextManager:
    """The weights an epoch is validated and checkpointed with: the moving average under
    options.ema (the model's own come back for training), else the model's own."""
    return run.step.average.applied() if run.step.average is not None else contextlib.nullcontext()


def _train_timed(run: _Run, epoch: int, progress: ProgressFn | None) -> tuple[dict[str, float], int, float]:
    """`train_one_epoch` with its wall time, a failed step explained in the user's terms."""
    t0 = time.perf_counter()
    try:
        totals, seen = train_one_epoch(run.step, run.plan, epoch, f"epoch {epoch}/{run.budget.planned}", progress)
    except StepFailed as failed:
        options = run.options
        if failed.loss is not None:
            raise AgecliError(
                f"the loss became {failed.loss} at epoch {epoch}, batch {failed.batch}/{run.plan.steps}; "
                f"{run.checkpointer.last_good(epoch)}. Lower --lr (now {options.lr:g}), keep gradient clipping "
                "on, or check the labels.") from None
        raise AgecliError(
            f"out of memory on {run.device} at epoch {epoch}, batch {failed.batch} (batch size "
            f"{run.plan.batches.batch_size}, input {run.spec.input_size}px). Lower --batch-size or --size, or keep "
            "--amp on.") from None
    if run.device.startswith("cuda"):
        torch.cuda.synchronize()
    return totals, seen, time.perf_counter() - t0


def _results(run: _Run, epoch: int, start_epoch: int, stopped_early: bool, seconds: float) -> dict[str, Any]:
    checkpointer = run.checkpointer
    return {
        "best_epoch": checkpointer.best_epoch,
        "epochs_run": epoch - start_epoch + 1 if epoch >= start_epoch else 0,
        "last_epoch": epoch,
        "stopped_early": stopped_early,
        "planned_epochs": run.budget.planned,
        "val": run.spec.metrics,
        "seconds": seconds,
        "train_images_per_s": run.images_seen / run.train_seconds if run.train_seconds else None,
        "train_faces": int(len(run.train_idx)),
        "val_faces": int(len(run.val_idx)),
        "batch_size": run.plan.batches.batch_size,
        "world_size": run.world.world_size,
        "device": run.device,
        "best": str(checkpointer.best_path),
        "last": str(checkpointer.last_path),
    }
