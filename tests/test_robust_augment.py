"""The robust augmentation (TrainOptions.robust_augment, `agecli.data.batches.degrade`) on real
UTKFace faces: what it does to a batch, that it is seeded and training-only, and that train and
distill run with it while every teacher keeps seeing clean crops. Skips without ../shared/data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agecli.data.batches import (DEGRADATIONS, Augment, Batch, Degrade, degrade, normalise, resize, to_input,
                                 to_nchw_unit, to_unit)
from agecli.engine import loop
from agecli.engine.inference import predict_store
from agecli.engine.loop import Preprocess, fit, plain_input
from agecli.engine.metrics import score
from agecli.modeling.backbones import build_model
from agecli.modeling.checkpoint import ModelSpec, load_checkpoint, read_checkpoint
from agecli.modeling.encodings import build_encoding
from agecli.options import TrainOptions
from agecli.store import FaceStore

from conftest import utkface_faces

# torchvision 0.29 deprecates the JPEG codec batches._jpeg uses (it still works); one warning per face

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY = dict(epochs=1, max_batches=2, batch_size=16, threads=1, workers=0, precise_bn_batches=1, val_batch_size=64)


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """32 real faces, uint8 (B, 64, 64, 3) as the store holds them."""
    images, _ = utkface_faces(32, 64)
    return torch.from_numpy(images)


def _batch(images: torch.Tensor) -> Batch:
    n = len(images)
    return Batch(images, torch.zeros(n), torch.full((n,), float("nan")), torch.full((n,), -1), torch.arange(n))


def _prep(robust: float, size: int = 48, augment: Augment | None = Augment()) -> Preprocess:
    return Preprocess(size, MEAN, STD, "cpu", augment, False, robust=robust)


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def high_freq(x: torch.Tensor) -> torch.Tensor:
    """Per image, the mean squared 4-neighbour Laplacian: noise raises it, blur lowers it."""
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.pow(2).mean(dim=(1, 2, 3))


def blockiness(x: torch.Tensor) -> torch.Tensor:
    """Per image, the mean jump across JPEG's 8-px block columns over the mean jump anywhere."""
    jumps = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2))
    return jumps[:, 7::8].mean(1) / jumps.mean(1)


# --------------------------------------------------------------------------- the batch
def test_share_zero_leaves_the_batch_and_the_random_stream_exactly_as_before(faces):
    before = torch.Generator().manual_seed(3)
    expected = to_input(faces, 48, MEAN, STD, augment=Augment(), generator=before)
    now = torch.Generator().manual_seed(3)
    batch, x = plain_input(_batch(faces), now, _prep(0.0))
    assert torch.equal(x, expected) and batch.degraded is None
    assert torch.equal(now.get_state(), before.get_state())   # not one extra random number drawn
    x01 = to_nchw_unit(faces)
    state = now.get_state()
    same, mask = degrade(x01, 0.0, now)
    assert same is x01 and mask is None and torch.equal(now.get_state(), state)


def test_share_one_degrades_every_face_and_stays_in_range(faces):
    x01 = to_unit(faces, 48, augment=Augment(), generator=torch.Generator().manual_seed(0))
    y, mask = degrade(x01, 1.0, torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (len(faces),) and bool(mask.all())
    assert y.shape == x01.shape and y.dtype == x01.dtype and y.device == x01.device
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert bool(((y - x01).abs().amax(dim=(1, 2, 3)) > 1e-4).all())
    # through fit's input function: the model's input shape and dtype, every face marked degraded
    batch, x = plain_input(_batch(faces), torch.Generator().manual_seed(0), _prep(1.0))
    assert x.shape == (len(faces), 3, 48, 48) and x.dtype == torch.float32 and bool(batch.degraded.all())
    assert float(_unnormalise(x).min()) >= -1e-5 and float(_unnormalise(x).max()) <= 1 + 1e-5


def test_a_share_degrades_about_that_share_and_leaves_the_others_alone(faces):
    x01 = to_nchw_unit(faces)
    y, mask = degrade(x01, 0.5, torch.Generator().manual_seed(2))
    assert 6 <= int(mask.sum()) <= 26, int(mask.sum())
    assert torch.equal(y[~mask], x01[~mask])
    assert bool(((y[mask] - x01[mask]).abs().amax(dim=(1, 2, 3)) > 0).all())


def test_the_same_seed_gives_the_same_faces_another_seed_others(faces):
    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, x = plain_input(_batch(faces), torch.Generator().manual_seed(seed), _prep(0.7))
        return x, batch.degraded

    (a, mask_a), (b, mask_b), (c, _) = run(5), run(5), run(6)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise"])
def test_noise_adds_high_frequency_energy_growing_with_severity(faces, name):
    x = to_nchw_unit(faces)
    mild, harsh = (DEGRADATIONS[name](x, torch.full((len(x),), u), torch.Generator().manual_seed(0),
                                      Degrade()).clamp(0, 1) for u in (0.1, 0.9))
    assert bool((high_freq(mild) > 2 * high_freq(x)).all())
    assert bool((high_freq(harsh) > high_freq(mild)).all())


@pytest.mark.parametrize("name", ["gaussian_blur", "box_blur"])
def test_blur_removes_high_frequency_energy_more_with_severity(faces, name):
    x = to_nchw_unit(faces)
    mild, harsh = (DEGRADATIONS[name](x, torch.full((len(x),), u), torch.Generator().manual_seed(0), Degrade())
                   for u in (0.1, 0.9))
    assert bool((high_freq(mild) < high_freq(x)).all())
    assert bool((high_freq(harsh) < 0.5 * high_freq(mild)).all())
    assert torch.allclose(harsh.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=2e-3)  # blur keeps the brightness


def test_jpeg_adds_block_edges_stronger_at_lower_quality(faces):
    x = to_nchw_unit(faces)
    mild, harsh = (DEGRADATIONS["jpeg"](x, torch.full((len(x),), u), torch.Generator(), Degrade())
                   for u in (0.1, 0.9))
    assert float(blockiness(x).mean()) < 1.05
    assert float(blockiness(harsh).mean()) > 1.5 and float(blockiness(harsh).mean()) > float(blockiness(mild).mean())
    assert float((harsh - x).abs().mean()) > float((mild - x).abs().mean()) > 0.005


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_degrade_runs_on_cuda_tensors_and_is_seeded(faces):
    x = to_nchw_unit(faces, "cuda")
    y, mask = degrade(x, 1.0, torch.Generator().manual_seed(4))
    again, _ = degrade(x, 1.0, torch.Generator().manual_seed(4))
    assert y.device == x.device and y.shape == x.shape and bool(mask.all()) and torch.equal(y, again)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


# --------------------------------------------------------------------------- training
def _fit(run, out_dir, options: TrainOptions):
    store = FaceStore.open(run)
    torch.manual_seed(0)
    enc = build_encoding("regression")
    model = build_model("mobilenet_v3_small", enc)
    spec = ModelSpec(arch="mobilenet_v3_small", encoding=enc.to_dict(), input_size=32)
    val_idx = store.indices("val")[:32]
    result = fit(model, spec, store, store.indices("train"), val_idx, out_dir, options)
    return result, store, val_idx


def test_fit_degrades_training_batches_only_and_is_seeded(tiny_run, tmp_path, monkeypatch):
    calls: list[tuple[int, float]] = []
    real = loop.degrade

    def spy(x, share, generator=None, **kw):
        calls.append((len(x), share))
        return real(x, share, generator, **kw)

    monkeypatch.setattr(loop, "degrade", spy)
    options = TrainOptions(robust_augment=1.0, seed=1, **TINY)
    result, store, val_idx = _fit(tiny_run, tmp_path / "a", options)
    # one call per training step, none for precise BN or validation
    assert calls == [(16, 1.0)] * 2
    model, spec = load_checkpoint(tmp_path / "a" / "best.pt")
    clean = score(predict_store(model, spec, store, val_idx))["mae"]
    assert result["val"]["mae"] == pytest.approx(clean, abs=1e-4)   # validated on clean faces
    _fit(tiny_run, tmp_path / "b", options)
    a, b = (read_checkpoint(tmp_path / d / "last.pt")["state_dict"] for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)   # same seed, same model


def test_train_with_robust_augment_completes_and_records_it(tiny_run):
    from agecli.stages.train import train

    train(tiny_run, arch="mobilenet", size=32, encoding="ldae", name="robust",
          options=TrainOptions(robust_augment=0.5, **TINY))
    manifest = json.loads((tiny_run / "train" / "robust" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["args"]["options"]["robust_augment"] == 0.5


# --------------------------------------------------------------------------- distillation
@pytest.fixture
def brightness_onnx(tmp_path):
    from test_distill import brightness_teacher  # an instant ONNX teacher taking 32 px faces

    return brightness_teacher(tmp_path / "teacher.onnx")


def test_distill_degrades_the_student_but_the_live_teacher_sees_clean_crops(tiny_run, brightness_onnx, monkeypatch):
    from agecli.stages.distill import distill
    from agecli.stages.distill.feeds import LiveTeacher

    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real = LiveTeacher.__call__

    def spy(self, batch, x):
        seen.append((batch.view.clone(), batch.degraded.clone(), x.detach().clone()))
        return real(self, batch, x)

    monkeypatch.setattr(LiveTeacher, "__call__", spy)
    options = TrainOptions(robust_augment=0.5, augment=True, **TINY)
    result = distill(tiny_run, teachers=[str(brightness_onnx)], student="squeezenet", size=32, name="robust",
                     options=options)
    manifest = json.loads((tiny_run / "distill" / "robust" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["args"]["options"]["robust_augment"] == 0.5
    assert result["metrics"]["student"]["n"] > 0
    assert len(seen) == 2
    for view, degraded, x in seen:
        # teacher and student share the crop (32 px, the teacher's size): equal where not degraded
        student01 = _unnormalise(x)
        assert 0 < int(degraded.sum()) < len(degraded)
        assert torch.allclose(student01[~degraded], view[~degraded], atol=1e-5)
        assert bool(((student01[degraded] - view[degraded]).abs().amax(dim=(1, 2, 3)) > 1e-3).all())


def test_crop_for_teacher_keeps_its_old_input_at_share_zero_and_the_view_clean(faces):
    from agecli.stages.distill.feeds import CropForTeacher

    old = to_unit(faces, 64, augment=Augment(), generator=torch.Generator().manual_seed(0))
    batch, x = CropForTeacher(64)(_batch(faces), torch.Generator().manual_seed(0), _prep(0.0, size=32))
    assert torch.equal(batch.view, old) and torch.equal(x, normalise(resize(old, 32), MEAN, STD))
    batch, x = CropForTeacher(64)(_batch(faces), torch.Generator().manual_seed(0), _prep(1.0, size=32))
    assert torch.equal(batch.view, old) and bool(batch.degraded.all())   # the teacher's crop stays clean
    assert not torch.allclose(x, normalise(resize(old, 32), MEAN, STD))


def test_teacher_views_degrade_the_student_crop_not_the_bank(tiny_run, brightness_onnx, tmp_path):
    from agecli.data.batches import apply_augment
    from agecli.stages.distill import TeacherViews
    from agecli.stages.teachers import load_teacher

    store = FaceStore.open(tiny_run)
    teacher = load_teacher(str(brightness_onnx))
    teacher.bind(store.manifest.get("alignment"), store.size, dataset=store.dataset)
    rows = store.indices("train")
    views = TeacherViews(teacher, store, rows, 2, tmp_path / "bank", view_size=32, batch_size=128)
    pick = torch.from_numpy(np.sort(rows[:24]))
    images = torch.from_numpy(np.ascontiguousarray(store.images[pick.numpy()]))
    batch = Batch(images, torch.zeros(24), torch.zeros(24), torch.zeros(24), pick)
    clean_batch, clean = views.make_input(batch, torch.Generator().manual_seed(0), _prep(0.0, size=32))
    bad_batch, bad = views.make_input(batch, torch.Generator().manual_seed(0), _prep(1.0, size=32))
    assert torch.equal(clean_batch.view_id, bad_batch.view_id) and bool(bad_batch.degraded.all())
    params = views.params[clean_batch.view_id, views.positions(pick)]
    assert torch.equal(clean, normalise(apply_augment(to_nchw_unit(images), 32, params), MEAN, STD))
    assert not torch.allclose(clean, bad)
    # the teacher's answers come from the bank, the same whatever the student's input
    assert torch.equal(views(clean_batch, clean).age, views(bad_batch, bad).age)
