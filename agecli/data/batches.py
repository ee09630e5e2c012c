"""Feeding faces from the store to a model: batches off the memory map, preprocessing on tensors.

Data loading must never be the bottleneck (benchmarks/train_throughput.py checks it):
batches are gathered from the memory-mapped uint8 array in a background thread (numpy
releases the GIL while copying), and resizing, augmentation and normalisation run as a
few batched tensor ops on the model's device instead of per-image PIL transforms.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from agecli.store import FaceStore


@dataclass
class Batch:
    images: torch.Tensor        # uint8 (B, S, S, 3) RGB, on the CPU
    age: torch.Tensor           # float (B,), NaN where unknown
    age_std: torch.Tensor       # float (B,), NaN where unknown
    gender: torch.Tensor        # long (B,), -1 where unknown
    index: torch.Tensor         # long (B,), row of the store
    # the augmented crop in [0, 1] at a size above the model's (fit's `view_size`), so a larger
    # teacher sees the very same augmentation at its own resolution; None otherwise
    view: torch.Tensor | None = None
    # which of the teacher's stored views each face was augmented as (fit's `views`); None otherwise
    view_id: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.index)


class Batches:
    """Iterate over `indices` of a store in batches, optionally shuffled (seeded per epoch)
    and sharded across distributed ranks."""

    def __init__(self, store: FaceStore, indices: Sequence[int], batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1, prefetch: int = 3):
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.prefetch = prefetch
        self.epoch = 0
        rec = store.records
        self._age = torch.tensor(rec["age"].to_numpy(dtype=np.float32))
        self._age_std = torch.tensor(rec["age_std"].to_numpy(dtype=np.float32))
        self._gender = torch.tensor(rec["gender"].to_numpy(dtype=np.int64))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        order = self.indices
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = order[rng.permutation(len(order))]
        if self.world_size > 1:  # equal share per rank (pad by wrapping) so DDP steps stay in lockstep
            per_rank = math.ceil(len(order) / self.world_size)
            order = np.resize(order, per_rank * self.world_size)[self.rank::self.world_size]
        return order

    def __len__(self) -> int:
        n = len(self.indices) if self.world_size == 1 else math.ceil(len(self.indices) / self.world_size)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _make(self, rows: np.ndarray) -> Batch:
        rows = np.sort(rows)  # sorted reads are sequential on the memory map
        images = torch.from_numpy(np.ascontiguousarray(self.store.images[rows]))
        index = torch.from_numpy(rows)
        return Batch(images, self._age[index], self._age_std[index], self._gender[index], index)

    def __iter__(self) -> Iterator[Batch]:
        order = self._order()
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and chunks and len(chunks[-1]) < self.batch_size:
            chunks.pop()
        if self.prefetch <= 0:
            for rows in chunks:
                yield self._make(rows)
            return
        slots: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for rows in chunks:
                    if stop.is_set():
                        return
                    slots.put(self._make(rows))
            except BaseException as exc:  # surfaced in the consumer
                slots.put(exc)
                return
            slots.put(None)

        worker = threading.Thread(target=produce, daemon=True)
        worker.start()
        try:
            while (item := slots.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while not slots.empty():
                slots.get_nowait()


@dataclass
class Augment:
    """Random geometric and photometric changes, applied to a whole batch at once."""

    scale: tuple[float, float] = (0.85, 1.05)   # zoom (1 = the stored crop)
    shift: float = 0.06                          # max translation, fraction of the side
    rotate: float = 10.0                         # max rotation, degrees
    flip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2


def to_input(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float], *,
             device: str | torch.device = "cpu", augment: Augment | None = None,
             generator: torch.Generator | None = None, channels_last: bool = False,
             params: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, S, S, 3) RGB -> normalised float (B, 3, size, size) on `device`."""
    x = to_unit(images, size, device=device, augment=augment, generator=generator, params=params)
    return normalise(x, mean, std, channels_last=channels_last)


def to_unit(images: torch.Tensor, size: int, *, device: str | torch.device = "cpu", augment: Augment | None = None,
            generator: torch.Generator | None = None, params: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, S, S, 3) RGB -> float (B, 3, size, size) in [0, 1] on `device`, augmented if asked
    (randomly, or exactly as the `draw_augment` numbers `params` say).

    The augmentation draws the same random numbers whatever `size` is, so one generator state
    gives the same crop at any resolution."""
    x = to_nchw_unit(images, device)
    if params is not None:
        return apply_augment(x, size, params)
    if augment is not None:
        return _augment(x, size, augment, generator)
    return resize(x, size)


def to_nchw_unit(images: torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 (B, S, S, 3) RGB -> float (B, 3, S, S) in [0, 1], on `device` (None: where it is).

    The one conversion from the store's layout to the models'; nothing is resized."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of (B, 3, H, W) to size x size (a no-op at that size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], *,
              channels_last: bool = False) -> torch.Tensor:
    """[0, 1] float (B, 3, H, W) -> (x - mean) / std, optionally in NHWC memory order."""
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    x = (x - mean_t) / std_t
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# the per-image numbers one augmentation draws, in drawing order (see `draw_augment`)
AUGMENT_FIELDS = ("zoom", "angle", "flip", "shift_x", "shift_y", "saturation", "contrast", "brightness")


def draw_augment(b: int, aug: Augment, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random numbers for `b` images, (b, len(AUGMENT_FIELDS)) on the CPU. Kept apart from
    `apply_augment` so a crop can be replayed exactly (the teacher's view bank stores them)."""

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=generator).mul_(hi - lo).add_(lo)

    zoom = uniform(*aug.scale)
    angle = uniform(-aug.rotate, aug.rotate) * math.pi / 180
    flip = torch.where(uniform(0, 1) < aug.flip, -1.0, 1.0)
    shift_x, shift_y = uniform(-aug.shift, aug.shift) * 2, uniform(-aug.shift, aug.shift) * 2
    sat = uniform(1 - aug.saturation, 1 + aug.saturation)
    con = uniform(1 - aug.contrast, 1 + aug.contrast)
    bright = uniform(-aug.brightness, aug.brightness)
    return torch.stack([zoom, angle, flip, shift_x, shift_y, sat, con, bright], 1)


def apply_augment(x: torch.Tensor, size: int, params: torch.Tensor) -> torch.Tensor:
    """Augment [0, 1] images (B, 3, H, W) with `draw_augment` numbers, output at size x size.
    The numbers are resolution-free, so the same row gives the same crop at any `size`."""
    b = x.shape[0]
    if x.shape[-1] > 2 * size:  # shrink first so grid_sample does not alias badly
        x = resize(x, 2 * size)
    zoom, angle, flip, shift_x, shift_y, sat, con, bright = params.to(x.device, torch.float32).unbind(1)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([
        torch.stack([cos * flip, -sin, shift_x], 1),
        torch.stack([sin * flip, cos, shift_y], 1),
    ], 1)
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gray = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = gray + (x - gray) * sat.view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * con.view(b, 1, 1, 1) + mean
    x = x + bright.view(b, 1, 1, 1)
    return x.clamp_(0.0, 1.0)


def _augment(x: torch.Tensor, size: int, aug: Augment, generator: torch.Generator | None) -> torch.Tensor:
    return apply_augment(x, size, draw_augment(x.shape[0], aug, generator))
