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
    # teacher sees the very same augmentation at its own resolution, or the clean crop at the
    # model's size when the model's input is degraded (`degraded`); None otherwise
    view: torch.Tensor | None = None
    # which of the teacher's stored views each face was augmented as (fit's `views`); None otherwise
    view_id: torch.Tensor | None = None
    # bool (B,): which faces the robust augmentation degraded (`degrade`); None when it is off.
    # A teacher must never see those inputs: `view` then holds the clean crop for it
    degraded: torch.Tensor | None = None

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


# --------------------------------------------------------------------------- robust augmentation
@dataclass(frozen=True)
class Degrade:
    """Severity ranges of `degrade`, each (mildest, harshest); a face's severity u in [0, 1)
    picks the point u of the way between them. They span ImageNet-C's severities 1-5 of
    the same corruptions (agecli.data.corruptions), spatial ones as fractions of the side."""

    noise_sigma: tuple[float, float] = (0.03, 0.38)     # gaussian noise std (ImageNet-C .08-.38)
    shot_scale: tuple[float, float] = (0.12, 0.58)      # shot noise std at white, sqrt(1/photons) (c 60-3)
    impulse_amount: tuple[float, float] = (0.01, 0.27)  # share of values set to 0 or 1 (.03-.27)
    blur_sigma: tuple[float, float] = (0.004, 0.027)    # gaussian blur sigma / side (1-6 px at 224)
    box_radius: tuple[float, float] = (0.012, 0.045)    # box blur radius / side (defocus 3-10 px at 224)
    jpeg_quality: tuple[float, float] = (40.0, 6.0)     # JPEG quality (ImageNet-C 25-7)


def _lerp(bounds: tuple[float, float], u: torch.Tensor) -> torch.Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * u


def _gaussian_noise(x: torch.Tensor, u: torch.Tensor, g: torch.Generator, r: Degrade) -> torch.Tensor:
    sigma = _lerp(r.noise_sigma, u).view(-1, 1, 1, 1)
    return x + sigma * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _shot_noise(x: torch.Tensor, u: torch.Tensor, g: torch.Generator, r: Degrade) -> torch.Tensor:
    """Photon noise as its Gaussian approximation (std grows with sqrt of the intensity), not
    the benchmark's Poisson draws: the same family, another sampler."""
    scale = _lerp(r.shot_scale, u).view(-1, 1, 1, 1)
    return x + scale * x.clamp(min=0).sqrt() * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _impulse_noise(x: torch.Tensor, u: torch.Tensor, g: torch.Generator, r: Degrade) -> torch.Tensor:
    """Salt and pepper on single channel values, half of `amount` each."""
    half = _lerp(r.impulse_amount, u).view(-1, 1, 1, 1) / 2
    v = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype)
    return torch.where(v < half, 0.0, torch.where(v > 1 - half, 1.0, x))


def _separable_blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Blur (n, C, H, W) with one normalised odd-length 1-D kernel per image (rows of `taps`),
    horizontally then vertically, as a single grouped convolution per direction."""
    n, c, h, w = x.shape
    k = taps.shape[1]
    weight = (taps / taps.sum(1, keepdim=True)).to(x.dtype).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, n * c, h, w), (k // 2,) * 4, mode="replicate")
    y = F.conv2d(y, weight.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(y, weight.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, h, w)


def _offsets(reach: float, device: torch.device) -> torch.Tensor:
    half = max(1, math.ceil(reach))
    return torch.arange(-half, half + 1, device=device, dtype=torch.float32).view(1, -1)


def _gaussian_blur(x: torch.Tensor, u: torch.Tensor, g: torch.Generator, r: Degrade) -> torch.Tensor:
    sigma = (_lerp(r.blur_sigma, u) * min(x.shape[-2:])).clamp(min=0.3).view(-1, 1)
    t = _offsets(3 * float(sigma.max()), x.device)
    return _separable_blur(x, torch.exp(-t ** 2 / (2 * sigma ** 2)))


def _box_blur(x: torch.Tensor, u: torch.Tensor, g: torch.Generator, r: Degrade) -> torch.Tensor:
    """An out-of-focus-like box blur; its edge taps are weighted by the part of them inside
    the radius, so the blur grows smoothly with it (a plain box jumps by whole pixels)."""
    radius = (_lerp(r.box_radius, u) * min(x.shape[-2:])).clamp(min=1.0).view(-1, 1)
    t = _offsets(float(radius.max()), x.device)
    return _separable_blur(x, (radius + 0.5 - t.abs()).clamp(0.0, 1.0))


def _jpeg(x: torch.Tensor, u: torch.Tensor, g: torch.Generator, r: Degrade) -> torch.Tensor:
    """Real JPEG (OpenCV's libjpeg), image by image on the CPU in uint8: ~0.2 ms per 64 px face."""
    import cv2

    quality = _lerp(r.jpeg_quality, u).round().int().tolist()
    pixels = x.mul(255).round_().clamp_(0, 255).to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for image, q in zip(pixels, quality):
        _, data = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, q])
        out.append(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1].copy())  # RGB <-> BGR around the codec
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, x.dtype).div_(255)


# name -> corruption of [0, 1] images (n, 3, H, W) at severities u (n,), with a generator on their device
DEGRADATIONS = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur, "box_blur": _box_blur, "jpeg": _jpeg,
}


def degrade(x: torch.Tensor, share: float, generator: torch.Generator | None = None,
            ranges: Degrade = Degrade()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training-only robustness augmentation: degrade a random `share` of the [0, 1] faces
    (B, 3, H, W) and return them with the bool (B,) mask of the degraded ones (CPU).

    Why: distilled students were markedly more fragile under noise than their no-teacher
    twins (noise MAE 18.4-22.6 against 16.9-17.8 in `agecli bench --corruptions`), Greco et
    al. 2021 stress robustness for age estimation, and AugMix (Hendrycks et al. 2020) is one
    known fix. The noise, blur and JPEG families overlap the benchmark's on purpose (as in
    Greco et al.), with other implementations: batched torch ops, shot noise by its Gaussian
    approximation, a box instead of a disk blur, continuous severities.

    Each chosen face gets one of `DEGRADATIONS` (uniformly) at a uniform severity u in
    [0, 1) within `ranges`, mixed AugMix-style with its clean self: x = (1 - m) x + m c(x),
    m ~ Beta(1, 1) = U(0, 1), so the model sees the whole way from clean to fully degraded
    (a single chain: the clean crop is already the augmented one).

    Random numbers: four draws per face and one seed per batch from `generator` (the noise
    fields come from a generator on x's device seeded by it), whatever is chosen, so the
    stream is the same for every outcome; `share` 0 draws nothing and returns x itself."""
    if share <= 0:
        return x, None
    b = x.shape[0]
    chosen = torch.rand(b, generator=generator) < share
    kind = torch.randint(len(DEGRADATIONS), (b,), generator=generator)
    severity = torch.rand(b, generator=generator)
    mix = torch.rand(b, generator=generator)
    seed = int(torch.randint(2 ** 62, (1,), generator=generator))
    noise = torch.Generator(device=x.device).manual_seed(seed)
    out = x.clone()
    for k, corrupt in enumerate(DEGRADATIONS.values()):
        rows = torch.nonzero(chosen & (kind == k)).flatten()
        if len(rows) == 0:
            continue
        rows_dev = rows.to(x.device)
        clean = x[rows_dev]
        bad = corrupt(clean, severity[rows].to(x.device), noise, ranges).clamp_(0.0, 1.0)
        out[rows_dev] = torch.lerp(clean, bad, mix[rows].to(x.device, x.dtype).view(-1, 1, 1, 1))
    return out.clamp_(0.0, 1.0), chosen
