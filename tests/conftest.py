"""Shared test fixtures: tiny face stores built directly (without running prepare).

`build_store(run, images, records)` writes RUN/prepare/ exactly as prepare does (faces.npy,
records.csv, a complete manifest). `utkface_faces(n, size)` loads real UTKFace chips from
../shared/data when it exists (tests using it skip with a reason otherwise);
`synthetic_faces(n, size)` makes images whose content depends on the age, so a model can
learn something from them anywhere.

Other helpers may append fixtures below; keep the existing names stable.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
UTKFACE_DIR = SHARED_DATA / "utkface" / "UTKFace"

os.environ.setdefault("OMP_NUM_THREADS", "2")


def _torch_threads() -> None:
    import torch

    torch.set_num_threads(1)  # the CPU is shared: OpenMP spinning with 2 threads is 5-40x slower under load


_torch_threads()


def require_utkface() -> Path:
    if not UTKFACE_DIR.is_dir():
        pytest.skip(f"real UTKFace faces not found at {UTKFACE_DIR} (../shared/data is absent)")
    return UTKFACE_DIR


def _records(n: int, ages, genders, races, paths, *, seed: int = 0, val: float = 0.15, test: float = 0.15,
             folds: int | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    split = np.where(u < test, "test", np.where(u < test + val, "val", "train"))
    return pd.DataFrame({
        "path": paths,
        "age": np.asarray(ages, dtype=float),
        "age_std": np.nan,
        "gender": np.asarray(genders, dtype=int),
        "race": np.asarray(races, dtype=int),
        "group": -1,
        "fold": (np.arange(n) % folds) if folds else -1,
        "subject": "",
        "split": split,
        "content": [f"c{i:06d}" for i in range(n)],
        "detector": "none",
        "score": np.nan,
        "box": "",
        "landmarks": "",
        "chosen_by": "only",
    })


@functools.lru_cache(maxsize=4)
def _load_utkface(n: int, size: int, seed: int) -> tuple[np.ndarray, tuple]:
    import cv2

    names = sorted(p.name for p in UTKFACE_DIR.iterdir() if p.name.endswith(".jpg.chip.jpg"))
    parsed = []
    for name in names:
        parts = name.split("_")
        if len(parts) == 4 and all(p.isdigit() for p in parts[:3]):
            parsed.append((name, int(parts[0]), int(parts[1]), int(parts[2])))
    rng = np.random.default_rng(seed)
    chosen = [parsed[i] for i in sorted(rng.choice(len(parsed), size=min(n, len(parsed)), replace=False))]
    images = np.empty((len(chosen), size, size, 3), dtype=np.uint8)
    for i, (name, *_rest) in enumerate(chosen):
        bgr = cv2.imread(str(UTKFACE_DIR / name), cv2.IMREAD_COLOR)
        images[i] = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    return images, tuple(chosen)


def utkface_faces(n: int = 300, size: int = 64, seed: int = 0, **split_kw) -> tuple[np.ndarray, pd.DataFrame]:
    """n real UTKFace chips (random but seeded choice), resized to size x size, with their labels."""
    require_utkface()
    images, chosen = _load_utkface(n, size, seed)
    paths, ages, genders, races = zip(*chosen)
    return images.copy(), _records(len(chosen), ages, genders, races, list(paths), seed=seed, **split_kw)


def synthetic_faces(n: int = 300, size: int = 64, seed: int = 0, **split_kw) -> tuple[np.ndarray, pd.DataFrame]:
    """Noise images whose brightness and a centred blob grow with the age (learnable, not faces)."""
    rng = np.random.default_rng(seed)
    ages = rng.integers(1, 90, n)
    yy, xx = np.mgrid[:size, :size]
    radius = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) ** 0.5
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, age in enumerate(ages):
        base = 40 + 1.8 * age
        blob = (radius < size * (0.1 + age / 250)) * 60
        images[i] = np.clip(base + blob[..., None] + rng.normal(0, 12, (size, size, 3)), 0, 255)
    return images, _records(n, ages, rng.integers(0, 2, n), rng.integers(0, 5, n),
                            [f"synthetic/{i}.png" for i in range(n)], seed=seed, **split_kw)


def build_store(run: Path, images: np.ndarray, records: pd.DataFrame, *, dataset: str = "utkface",
                label_space: str = "ages 0-100", alignment: dict | None = None) -> Path:
    """Write RUN/prepare/ (faces.npy, records.csv, rejects.csv, complete manifest); returns the run dir."""
    from agecli.rundir import Stage, atomic_path, write_csv
    from agecli.store import RECORD_COLUMNS, Alignment

    run = Path(run)
    alignment = alignment or Alignment(method="resize", size=int(images.shape[1]), margin=0.0,
                                       template="utkface").to_dict()
    with Stage(run, "prepare", args={"dataset": dataset, "fixture": True}) as stage:
        with atomic_path(stage.path("faces.npy")) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, np.ascontiguousarray(images, dtype=np.uint8))
        write_csv(stage.path("records.csv"), records[RECORD_COLUMNS])
        write_csv(stage.path("rejects.csv"), pd.DataFrame(columns=["path", "reason"]))
        stage.set(alignment=alignment, dataset=dataset, label_space=label_space, protocol="fixture")
        stage.complete(results={"faces": int(len(images))})
    return run


@pytest.fixture
def tiny_run(tmp_path) -> Path:
    """A run with 300 real UTKFace faces at 64 px (skips when ../shared/data is absent)."""
    images, records = utkface_faces(300, 64)
    return build_store(tmp_path / "run", images, records)


@pytest.fixture
def synthetic_run(tmp_path) -> Path:
    """A run with 240 synthetic age-dependent images at 48 px (no shared data needed)."""
    images, records = synthetic_faces(240, 48)
    return build_store(tmp_path / "synthetic", images, records, dataset="synthetic")


# --------------------------------------------------------------------------- bench/export/predict
def train_tiny_checkpoint(run: Path, path: Path, *, arch: str = "mobilenet_v3_small", encoding: str = "ldae",
                          size: int = 48, gender: bool = True, epochs: int = 3, seed: int = 0,
                          stage: str = "train") -> Path:
    """Fit a small model on the run's train split for a few epochs (plain loop, no agecli.train)
    and save it as an agecli checkpoint with the store's alignment. Returns the path."""
    import torch

    from agecli.modeling.checkpoint import ModelSpec, save_checkpoint
    from agecli.data.batches import Batches, to_input
    from agecli.modeling.encodings import build_encoding
    from agecli.modeling.backbones import build_model
    from agecli.store import FaceStore

    torch.manual_seed(seed)
    store = FaceStore.open(run)
    enc = build_encoding(encoding)
    model = build_model(arch, enc, gender=gender)
    spec = ModelSpec(arch=arch, encoding=enc.to_dict(), input_size=size, gender=gender,
                     alignment=store.alignment.to_dict(), provenance={"stage": stage, "run": str(run)})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = Batches(store, store.indices("train"), 32, shuffle=True, seed=seed, prefetch=0)
    model.train()
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for batch in batches:
            out = model(to_input(batch.images, size, spec.mean, spec.std))
            loss = enc.loss(out["age"], batch.age, None)
            if gender:
                loss = loss + torch.nn.functional.cross_entropy(out["gender"], batch.gender.clamp_min(0))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    save_checkpoint(path, model, spec)
    return path


def build_bench_run(root: Path, *, n: int = 240, size: int = 64, real: bool = True) -> Path:
    """A run with a store (real UTKFace faces when available, else synthetic), a complete
    train stage holding a 'teacher' checkpoint and a distill stage holding a 'student'."""
    from agecli.rundir import Stage

    images, records = (utkface_faces(n, size) if real else synthetic_faces(n, size))
    run = build_store(root / "run", images, records)
    with Stage(run, "train", "mobilenet_v3_small") as st:
        train_tiny_checkpoint(run, st.path("best.pt"), size=48, epochs=2)
        st.complete()
    with Stage(run, "train", "scratch") as st:   # trained, but no student learnt from it: a baseline
        train_tiny_checkpoint(run, st.path("best.pt"), arch="shufflenet_v2_x1_0", size=32, epochs=1)
        st.complete()
    with Stage(run, "distill", "shufflenet",
               args={"teachers": [str(run / "train" / "mobilenet_v3_small" / "best.pt")]}) as st:
        train_tiny_checkpoint(run, st.path("best.pt"), arch="shufflenet_v2_x1_0", size=32, epochs=2,
                              stage="distill")
        st.complete()
    return run


@pytest.fixture(scope="session")
def bench_run(tmp_path_factory) -> Path:
    """Session-wide run with real faces, a trained teacher and student (skips without shared data)."""
    require_utkface()
    return build_bench_run(tmp_path_factory.mktemp("bench"))
