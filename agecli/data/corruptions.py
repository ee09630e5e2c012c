"""The 15 ImageNet-C corruptions (Hendrycks and Dietterich, ICLR 2019) for face crops.

    corrupt(image, "motion_blur", severity=3, seed=0)   -> uint8 (H, W, 3), same shape
    corrupt_batch(images, name, severity, seed=0)       -> uint8 (N, H, W, 3)
    CORRUPTIONS                                         -> name -> Corruption(family, fn)

Every function follows the published `make_imagenet_c.py` definitions and their five
severity parameter sets, re-implemented with numpy and OpenCV (the `imagecorruptions`
package no longer imports on current stacks). Two deliberate differences, both because
faces here are small crops (64-128 px) rather than 224 px ImageNet images:

- Spatial parameters (blur radii and sigmas, glass-blur displacement, snow flake zoom and
  streak length, elastic displacement, fog fractal size) are multiplied by side / 224, so
  a corruption looks the same relative to the image as in ImageNet-C. Photometric
  parameters (noise levels, brightness, contrast, JPEG quality, pixelate factor, zoom
  factors) are used unchanged.
- `frost` blends the image with photographs of frost in the original. Those photos are not
  redistributable here, so `frost_texture` synthesises one procedurally: a dim bluish
  plasma-fractal haze with many thin, bright, branching ice needles drawn as random walks,
  slightly blurred. Its mean (~0.4) and contrast are close to the original frost images;
  the published blend weights (image, frost) are kept.

ImageMagick's motion blur (used by ImageNet-C through Wand) is reproduced as a one-sided
line kernel of 2*radius+1 Gaussian-weighted taps at the given angle.

Everything is deterministic given `seed`: each image gets its own generator derived from
(seed, corruption, severity, index).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from agecli.errors import AgecliError

REFERENCE_SIDE = 224  # the ImageNet-C image side the published parameters are tuned for
SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Corruption:
    name: str
    family: str  # noise | blur | weather | digital
    fn: Callable[[np.ndarray, int, np.random.Generator], np.ndarray]  # float32 [0,1] -> float32


CORRUPTIONS: dict[str, Corruption] = {}


def _register(family: str):
    def wrap(fn):
        name = fn.__name__
        if name in CORRUPTIONS:
            raise ValueError(f"corruption {name!r} registered twice")
        CORRUPTIONS[name] = Corruption(name, family, fn)
        return fn

    return wrap


def get_corruption(name: str) -> Corruption:
    if name not in CORRUPTIONS:
        import difflib

        close = difflib.get_close_matches(name, list(CORRUPTIONS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise AgecliError(f"unknown corruption {name!r}.{hint} Valid: {', '.join(CORRUPTIONS)}.")
    return CORRUPTIONS[name]


def resolve_names(names) -> list[str]:
    """None/"all" -> all 15; otherwise validated names (a family name expands to its members)."""
    if names is None or names == "all" or list(names) == ["all"]:
        return list(CORRUPTIONS)
    out: list[str] = []
    for name in names:
        members = [c.name for c in CORRUPTIONS.values() if c.family == name]
        out.extend(members or [get_corruption(name).name])
    return list(dict.fromkeys(out))


def corrupt(image: np.ndarray, name: str, severity: int, *, seed: int = 0, index: int = 0) -> np.ndarray:
    """Apply one corruption at severity 1-5 to an RGB uint8 image (H, W, 3); same shape, uint8."""
    corruption = get_corruption(name)
    if severity not in SEVERITIES:
        raise AgecliError(f"severity must be 1-5, got {severity}.")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), severity, index])
    x = image.astype(np.float32) / 255.0
    y = corruption.fn(x, severity, rng)
    return np.clip(np.rint(np.asarray(y, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def corrupt_batch(images: np.ndarray, name: str, severity: int, *, seed: int = 0,
                  offset: int = 0) -> np.ndarray:
    """`corrupt` over (N, H, W, 3); image i uses index offset+i, so batching does not change results."""
    return np.stack([corrupt(np.asarray(im), name, severity, seed=seed, index=offset + i)
                     for i, im in enumerate(images)]) if len(images) else np.asarray(images).copy()


# --------------------------------------------------------------------------- helpers
def _scale(x: np.ndarray) -> float:
    return min(x.shape[:2]) / REFERENCE_SIDE


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return x
    return cv2.GaussianBlur(x, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def _filter(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return cv2.filter2D(x, -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """ImageNet-C's aliased disk kernel for defocus blur. Pixels are weighted by the part of
    them the disk covers (8x8 supersampling), so the small radii of scaled-down parameters
    still blur instead of collapsing to a single pixel."""
    half = max(8, int(np.ceil(radius)) + 1)
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    span = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()
    xx, yy = np.meshgrid(span, span)
    inside = ((xx ** 2 + yy ** 2) <= max(radius, 0.5) ** 2).astype(np.float32)
    disk = inside.reshape(2 * half + 1, 8, 2 * half + 1, 8).mean(axis=(1, 3))
    disk /= disk.sum()
    ksize = 3 if radius <= 8 else 5
    return cv2.GaussianBlur(disk, (ksize, ksize), sigmaX=alias_blur) if alias_blur > 0 else disk


def _motion_kernel(radius: float, sigma: float, angle_deg: float) -> np.ndarray:
    """ImageMagick MotionBlurImage: 2r+1 one-sided taps, weight exp(-i^2 / 2 sigma^2), along `angle`."""
    radius = max(1, int(round(radius)))
    sigma = max(sigma, 0.3)
    width = 2 * radius + 1
    taps = np.arange(width)
    weights = np.exp(-(taps ** 2) / (2 * sigma ** 2))
    theta = np.deg2rad(angle_deg)
    dx = np.rint(taps * np.cos(theta)).astype(int)
    dy = np.rint(taps * np.sin(theta)).astype(int)
    side = 2 * width + 1
    kernel = np.zeros((side, side), dtype=np.float64)
    np.add.at(kernel, (dy + width, dx + width), weights)
    return (kernel / kernel.sum()).astype(np.float32)


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    return _filter(x, _motion_kernel(radius, sigma, angle))


def _clipped_zoom(x: np.ndarray, zoom: float) -> np.ndarray:
    """Zoom into the centre by `zoom`, keeping the shape (ImageNet-C's clipped_zoom)."""
    h, w = x.shape[:2]
    ch, cw = max(1, int(np.ceil(h / zoom))), max(1, int(np.ceil(w / zoom)))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[top:top + ch, left:left + cw]
    out = cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)
    return out.reshape(x.shape)


def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map in [0, 1] (ImageNet-C's fog); mapsize a power of two."""
    maparray = np.zeros((mapsize, mapsize), dtype=np.float64)
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array):
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        corner = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        square = corner + np.roll(corner, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(square)
        dr = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ul = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(
            dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1))
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(
            dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0))
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / max(maparray.max(), 1e-12)


def frost_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural stand-in for ImageNet-C's frost photographs, float32 (h, w, 3) in [0, 1]."""
    mapsize = 1 << int(np.ceil(np.log2(max(h, w, 8))))
    haze = plasma_fractal(mapsize, 2.0, rng)[:h, :w].astype(np.float32)
    layer = np.zeros((h, w), dtype=np.float32)
    step = max(1.0, min(h, w) / 64)
    for _ in range(int(0.06 * h * w / step ** 2) + 8):  # ice needles: branching random walks
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        angle = rng.uniform(0, 2 * np.pi)
        brightness = rng.uniform(0.4, 1.0)
        for _ in range(int(rng.integers(3, 12))):
            angle += rng.normal(0, 0.5)
            ny, nx = y + step * 2 * np.sin(angle), x + step * 2 * np.cos(angle)
            cv2.line(layer, (int(x), int(y)), (int(nx), int(ny)), float(brightness), 1, cv2.LINE_AA)
            y, x = ny, nx
            brightness *= 0.9
    layer = np.maximum(layer, _gaussian(layer, 1.5 * step) * 1.5)
    frost = 0.22 + 0.25 * haze + 0.6 * np.clip(layer, 0, 1) + rng.normal(0, 0.03, (h, w)).astype(np.float32)
    tint = np.array([0.88, 0.95, 1.0], dtype=np.float32)  # frost photographs are slightly blue
    return np.clip(frost[..., None] * tint, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------- noise
@_register("noise")
def gaussian_noise(x, severity, rng):
    c = [0.08, 0.12, 0.18, 0.26, 0.38][severity - 1]
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1)


@_register("noise")
def shot_noise(x, severity, rng):
    c = [60, 25, 12, 5, 3][severity - 1]
    return np.clip(rng.poisson(x * c) / c, 0, 1)


@_register("noise")
def impulse_noise(x, severity, rng):
    c = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]  # skimage random_noise(mode="s&p", amount=c)
    out = x.copy()
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


# --------------------------------------------------------------------------- blur
@_register("blur")
def defocus_blur(x, severity, rng):
    radius, alias = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][severity - 1]
    s = _scale(x)
    return np.clip(_filter(x, _disk(radius * s, alias * s)), 0, 1)


@_register("blur")
def glass_blur(x, severity, rng):
    sigma, max_delta, iterations = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)][severity - 1]
    s = _scale(x)
    sigma, delta = sigma * s, max(1, int(round(max_delta * s)))
    x = _gaussian(x, sigma).copy()
    h, w = x.shape[:2]
    for _ in range(iterations):  # locally shuffle pixels, sequentially as in the original
        shifts = rng.integers(-delta, delta, size=(h, w, 2)).tolist()
        order = list(range(h * w))  # swap pixel indices in pure Python, then gather once
        for i in range(h - delta, delta, -1):
            row = shifts[i]
            for j in range(w - delta, delta, -1):
                dy, dx = row[j]
                a, b = i * w + j, (i + dy) * w + (j + dx)
                order[a], order[b] = order[b], order[a]
        x = x.reshape(h * w, -1)[order].reshape(h, w, -1)
    return np.clip(_gaussian(x, sigma), 0, 1)


@_register("blur")
def motion_blur(x, severity, rng):
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][severity - 1]
    s = _scale(x)
    return np.clip(_motion_blur(x, radius * s, sigma * s, rng.uniform(-45, 45)), 0, 1)


@_register("blur")
def zoom_blur(x, severity, rng):
    zooms = [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
             np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)][severity - 1]
    out = np.zeros_like(x)
    for zoom in zooms:
        out += _clipped_zoom(x, float(zoom))
    return np.clip((x + out) / (len(zooms) + 1), 0, 1)


# --------------------------------------------------------------------------- weather
@_register("weather")
def snow(x, severity, rng):
    c = [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
         (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)][severity - 1]
    s = _scale(x)
    h, w = x.shape[:2]
    flakes = rng.normal(size=(h, w), loc=c[0], scale=c[1]).astype(np.float32)
    flakes = _clipped_zoom(flakes, c[2])
    flakes[flakes < c[3]] = 0
    flakes = np.clip(_motion_blur(np.clip(flakes, 0, 1), c[4] * s, c[5] * s, rng.uniform(-135, -45)), 0, 1)
    gray = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
    x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
    return np.clip(x + flakes[..., None] + np.rot90(flakes, k=2)[..., None], 0, 1)


@_register("weather")
def frost(x, severity, rng):
    weight_image, weight_frost = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][severity - 1]
    texture = frost_texture(x.shape[0], x.shape[1], rng)
    return np.clip(weight_image * x + weight_frost * texture, 0, 1)


@_register("weather")
def fog(x, severity, rng):
    strength, decay = [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)][severity - 1]
    h, w = x.shape[:2]
    # ImageNet-C draws a 256 map for 224 images; keep that ratio of map size to image size
    mapsize = 1 << int(np.ceil(np.log2(max(h, w) * 256 / REFERENCE_SIDE)))
    max_val = x.max()
    fractal = plasma_fractal(mapsize, decay, rng)[:h, :w].astype(np.float32)
    x = x + strength * fractal[..., None]
    return np.clip(x * max_val / (max_val + strength), 0, 1)


# --------------------------------------------------------------------------- digital
@_register("digital")
def brightness(x, severity, rng):
    c = [0.1, 0.2, 0.3, 0.4, 0.5][severity - 1]
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 1)


@_register("digital")
def contrast(x, severity, rng):
    c = [0.4, 0.3, 0.2, 0.1, 0.05][severity - 1]
    means = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1)


@_register("digital")
def elastic_transform(x, severity, rng):
    # published (alpha, sigma, alpha_affine) as multiples of 244 (the original's own constant)
    c = [(2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02)][severity - 1]
    h, w = x.shape[:2]
    unit = 244 * _scale(x)
    alpha, sigma, alpha_affine = c[0] * unit, c[1] * unit, c[2] * unit
    center = np.float32([w, h]) // 2
    square = min(h, w) // 3
    pts1 = np.float32([center + square, [center[0] + square, center[1] - square], center - square])
    pts2 = pts1 + rng.uniform(-alpha_affine, alpha_affine, size=pts1.shape).astype(np.float32)
    x = cv2.warpAffine(x, cv2.getAffineTransform(pts1, pts2), (w, h), borderMode=cv2.BORDER_REFLECT_101)

    def field():
        noise = rng.uniform(-1, 1, size=(h, w)).astype(np.float32)
        return (_gaussian(noise, sigma) * alpha).astype(np.float32)

    dx, dy = field(), field()
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return np.clip(cv2.remap(x, grid_x + dx, grid_y + dy, interpolation=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT_101), 0, 1)


@_register("digital")
def pixelate(x, severity, rng):
    c = [0.6, 0.5, 0.4, 0.3, 0.25][severity - 1]
    h, w = x.shape[:2]
    small = cv2.resize(x, (max(1, int(w * c)), max(1, int(h * c))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


@_register("digital")
def jpeg_compression(x, severity, rng):
    quality = [25, 18, 15, 10, 7][severity - 1]
    image = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    decoded = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return decoded.astype(np.float32) / 255.0


FAMILIES = tuple(dict.fromkeys(c.family for c in CORRUPTIONS.values()))
assert len(CORRUPTIONS) == 15, sorted(CORRUPTIONS)
