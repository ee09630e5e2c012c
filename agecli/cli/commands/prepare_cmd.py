"""`agecli prepare`: the typer command; all logic lives in agecli.prepare.prepare."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from agecli.cli.commands import emit_json
from agecli.stages.prepare import DEFAULTS


def register(app: typer.Typer) -> None:
    from agecli.data.datasets import DATASETS

    names = ", ".join(DATASETS)

    @app.command("prepare", help=f"""Detect, align, label and split the faces of a dataset into RUN/prepare/.

DATASET is one of: {names}.

\b
Examples:
  agecli prepare utkface --root ../shared/data/utkface/UTKFace
  agecli prepare adience --root ../shared/data/adience-sample --run runs/adience
  agecli prepare folder --root ~/photos --size 112 --margin 0.3
  agecli prepare csv --root labels.csv --limit 200 --json
  agecli prepare fgnet --root FGNET --shard 1/2   # then --shard 2/2, then once without --shard

Re-running resumes: finished chunks are kept and the result is identical.""")
    def prepare_command(
        dataset: str = typer.Argument(..., help=f"dataset layout: {names}"),
        root: Path = typer.Option(..., "--root", help="folder (or CSV file for `csv`) holding the dataset"),
        run: Optional[Path] = typer.Option(None, "--run", help="run directory [default: runs/<dataset>]"),
        size: int = typer.Option(DEFAULTS["size"], help="side of the aligned face crops, pixels"),
        margin: float = typer.Option(DEFAULTS["margin"], help="context around the landmark template (0.4 = 40% more)"),
        template: str = typer.Option(DEFAULTS["template"], help="5-point template: arcface5 or utkface_chip"),
        detector: Optional[str] = typer.Option(None, help="mtcnn, or none for already-aligned crops "
                                               "[default: none for utkface, else mtcnn]"),
        device: str = typer.Option("cpu", help="cpu or cuda (batched detection on the GPU)"),
        workers: Optional[int] = typer.Option(None, help="CPU worker processes [default: all cores with mtcnn]"),
        limit: Optional[int] = typer.Option(None, help="only N images, a seeded random sample (quick trials)"),
        shard: Optional[str] = typer.Option(None, help="I/N: process every N-th chunk starting at I (1-based)"),
        strict: bool = typer.Option(False, "--strict", help="fail if images listed by the dataset are missing"),
        seed: int = typer.Option(0, help="seed of the train/val/test assignment"),
        val_fraction: float = typer.Option(DEFAULTS["val_fraction"], help="share of groups for validation"),
        test_fraction: float = typer.Option(DEFAULTS["test_fraction"], help="share for test (no official split)"),
        max_side: int = typer.Option(DEFAULTS["max_side"], help="longer side images are scaled to for detection"),
        as_json: bool = typer.Option(False, "--json", help="print the results as one JSON object"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ) -> None:
        from agecli.stages.prepare import prepare

        kwargs = dict(size=size, margin=margin, template=template, detector=detector, device=device,
                      workers=workers, limit=limit, shard=shard, strict=strict, seed=seed,
                      val_fraction=val_fraction, test_fraction=test_fraction, max_side=max_side)
        from agecli.progress import rich_progress

        with rich_progress(quiet or as_json) as progress:
            results = prepare(dataset, root, run, progress=progress, **kwargs)
        if as_json:
            emit_json(results)
        elif not quiet:
            _summary(results)


def _summary(results: dict) -> None:
    from rich.console import Console

    console = Console()
    if "shard" in results:
        console.print(f"shard {results['shard']}: {results['images']} images in {results['chunks']} chunks "
                      f"({results['chunks_reused']} already done). Run once more without --shard to finish.")
        return
    note = " (already prepared with these settings; nothing to do)" if results.get("reused") else ""
    console.print(f"[bold]{results['faces_stored']}[/bold] faces stored from {results['images_seen']} images "
                  f"in {results['elapsed_s']} s{note} -> {results['run']}/prepare")
    if results.get("missing"):
        console.print(f"missing images: {results['missing']} (listed in {results['run']}/prepare/missing.txt)")
    if results.get("rejects"):
        console.print("rejects: " + ", ".join(f"{k} {v}" for k, v in results["rejects"].items()))
    if results.get("quirks"):
        console.print("quirks: " + ", ".join(f"{k} {v}" for k, v in results["quirks"].items()))
    console.print(f"splits: {results.get('splits')}")
    console.print(f"next: agecli train --run {results['run']}")
