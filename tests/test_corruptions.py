"""The 15 ImageNet-C corruptions: each changes a face the way its definition says."""

from __future__ import annotations

import numpy as np
import pytest

from agecli.data.corruptions import CORRUPTIONS, FAMILIES, SEVERITIES, corrupt, corrupt_batch, resolve_names
from agecli.errors import AgecliError


def _image(size: int = 64) -> np.ndarray:
    """Real UTKFace chips when available (a natural image), else smooth shapes with edges."""
    try:
        from conftest import UTKFACE_DIR, utkface_faces

        if UTKFACE_DIR.is_dir():
            return utkface_faces(4, size)[0]
    except Exception:
        pass
    yy, xx = np.mgrid[:size, :size] / size
    base = np.stack([0.3 + 0.4 * xx, 0.2 + 0.5 * yy, 0.5 + 0.2 * np.sin(6 * xx)], -1)
    base[(xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.08] *= 0.6
    # fine detail, as faces have (hair, eyes): without it a blur has little to remove
    base += 0.15 * ((np.floor(xx * size / 3) + np.floor(yy * size / 3)) % 2)[..., None] - 0.075
    img = (np.clip(base, 0, 1) * 255).astype(np.uint8)
    return np.stack([np.roll(img, k * 3, axis=1) for k in range(4)])


IMAGES = _image()


def _hf(batch: np.ndarray) -> float:
    """High-frequency energy: mean absolute difference of horizontally and vertically adjacent pixels."""
    g = batch.astype(np.float64).mean(-1)
    return float(np.abs(np.diff(g, axis=-1)).mean() + np.abs(np.diff(g, axis=-2)).mean())


def _mse(a, b) -> float:
    return float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())


def _colours(batch) -> float:
    return float(np.mean([len(np.unique(im.reshape(-1, 3), axis=0)) for im in batch]))


def _blockiness(batch) -> float:
    """Jumps across 8-pixel JPEG block borders relative to jumps inside blocks."""
    g = batch.astype(np.float64).mean(-1)
    d = np.abs(np.diff(g, axis=-1))
    border = d[..., 7::8].mean()
    inside = np.delete(d, np.s_[7::8], axis=-1).mean()
    return float(border / inside)


def test_registry_has_the_fifteen_in_four_families():
    assert len(CORRUPTIONS) == 15
    assert set(FAMILIES) == {"noise", "blur", "weather", "digital"}
    assert resolve_names(None) == list(CORRUPTIONS)
    assert resolve_names(["blur"]) == ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur"]
    with pytest.raises(AgecliError, match="gaussian_noise"):
        corrupt(IMAGES[0], "gausian_noise", 1)
    with pytest.raises(AgecliError, match="1-5"):
        corrupt(IMAGES[0], "contrast", 6)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_shape_dtype_change_and_determinism(name):
    out = corrupt_batch(IMAGES, name, 3, seed=7)
    assert out.shape == IMAGES.shape and out.dtype == np.uint8
    assert _mse(out, IMAGES) > 1.0, f"{name} left the image unchanged"
    again = corrupt_batch(IMAGES, name, 3, seed=7)
    assert np.array_equal(out, again), f"{name} is not deterministic for a fixed seed"
    # batching does not change an image's result
    assert np.array_equal(corrupt(IMAGES[1], name, 3, seed=7, index=1), out[1])


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise"])
def test_noise_raises_high_frequency_energy(name):
    clean = _hf(IMAGES)
    levels = [_hf(corrupt_batch(IMAGES, name, s)) for s in SEVERITIES]
    assert levels[0] > clean * 1.2
    assert all(b > a for a, b in zip(levels, levels[1:])), levels


@pytest.mark.parametrize("name", ["defocus_blur", "motion_blur", "zoom_blur"])
def test_blur_lowers_high_frequency_energy(name):
    clean = _hf(IMAGES)
    levels = [_hf(corrupt_batch(IMAGES, name, s)) for s in SEVERITIES]
    assert levels[0] < clean
    assert levels[-1] < levels[0] * 0.9, levels


def test_glass_blur_shuffles_locally_and_blurs():
    out = corrupt_batch(IMAGES, "glass_blur", 5)
    assert abs(out.mean() - IMAGES.mean()) < 3  # pixels move, the colours stay
    assert _mse(out, IMAGES) > 50


def test_brightness_raises_mean_contrast_lowers_std():
    means = [corrupt_batch(IMAGES, "brightness", s).mean() for s in SEVERITIES]
    assert means[0] > IMAGES.mean() and all(b > a for a, b in zip(means, means[1:]))
    stds = [corrupt_batch(IMAGES, "contrast", s).astype(float).std() for s in SEVERITIES]
    assert stds[0] < IMAGES.astype(float).std() and all(b < a for a, b in zip(stds, stds[1:]))
    assert abs(corrupt_batch(IMAGES, "contrast", 5).mean() - IMAGES.mean()) < 2  # mean kept


def test_jpeg_introduces_blockiness():
    clean = _blockiness(IMAGES)
    worst = _blockiness(corrupt_batch(IMAGES, "jpeg_compression", 5))
    assert worst > clean * 1.3, (clean, worst)
    errors = [_mse(corrupt_batch(IMAGES, "jpeg_compression", s), IMAGES) for s in SEVERITIES]
    assert all(b > a for a, b in zip(errors, errors[1:])), errors


def test_pixelate_reduces_distinct_colours():
    counts = [_colours(corrupt_batch(IMAGES, "pixelate", s)) for s in SEVERITIES]
    assert counts[0] < _colours(IMAGES)
    assert all(b < a for a, b in zip(counts, counts[1:])), counts


def test_weather_brightens_or_veils():
    for name in ("snow", "frost"):
        assert corrupt_batch(IMAGES, name, 3).mean() > IMAGES.mean() + 10, name
    fog = corrupt_batch(IMAGES, "fog", 3)
    assert fog.astype(float).std() < IMAGES.astype(float).std()  # a veil lowers contrast
    assert _hf(fog) < _hf(IMAGES)


def test_elastic_moves_pixels_without_changing_colours_much():
    out = corrupt_batch(IMAGES, "elastic_transform", 5)
    assert _mse(out, IMAGES) > 20
    assert abs(out.mean() - IMAGES.mean()) < 6


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur",
                                  "zoom_blur", "snow", "brightness", "contrast", "jpeg_compression"])
def test_severity_is_monotonic_in_distortion(name):
    errors = [_mse(corrupt_batch(IMAGES, name, s), IMAGES) for s in SEVERITIES]
    assert all(b > a for a, b in zip(errors, errors[1:])), errors
