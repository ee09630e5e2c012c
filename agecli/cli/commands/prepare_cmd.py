"""`agecli prepare`: the typer command; all logic lives in agecli.stages.prepare.prepare, and
every default in agecli.options.PrepareOptions.

No `from __future__ import annotations` here: the `Annotated` help of DATASET names the
datasets, a local of `register`, which a string annotation could not see."""

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from agecli.cli.commands import emit_json
from agecli.cli.params import complete_devices
from agecli.options import DETECTORS, MAX_SIZE, MIN_SIZE, PrepareOptions


def register(app: typer.Typer) -> None:
    from agecli.data.datasets import DATASETS

    names = ", ".join(DATASETS)
    dataset_choice = Literal[tuple(DATASETS)]  # type: ignore[valid-type]

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
        dataset: Annotated[dataset_choice, typer.Argument(help="the dataset's layout")],
        root: Annotated[Path, typer.Option("--root", help="folder (or CSV file for `csv`) holding the dataset")],
        run: Annotated[Optional[Path], typer.Option("--run", help="run directory [default: runs/<dataset>]")] = None,
        size: Annotated[int, typer.Option(min=MIN_SIZE, max=MAX_SIZE, help="side of the aligned face crops, pixels")]
        = PrepareOptions.size,
        margin: Annotated[float, typer.Option(help="context around the landmark template (0.4 = 40% more)")]
        = PrepareOptions.margin,
        template: Annotated[str, typer.Option(
            autocompletion=lambda incomplete: [t for t in ("arcface5", "utkface_chip") if t.startswith(incomplete)],
            help="5-point template: arcface5 or utkface_chip")]
        = PrepareOptions.template,
        detector: Annotated[Optional[Literal[DETECTORS]], typer.Option(  # type: ignore[valid-type]
            help="mtcnn, or none for already-aligned crops [default: none for utkface, else mtcnn]")]
        = PrepareOptions.detector,
        device: Annotated[str, typer.Option(autocompletion=complete_devices,
                                            help="where MTCNN runs: auto (cuda when torch sees a GPU, else cpu) | "
                                                 "cpu | cuda | cuda:N")] = PrepareOptions.device,
        workers: Annotated[Optional[int], typer.Option(
            min=0, help="CPU worker processes; 0 detects in this process [default: up to 8 with mtcnn on the CPU]")]
        = PrepareOptions.workers,
        limit: Annotated[Optional[int], typer.Option(
            min=1, help="only N images, a seeded random sample (quick trials) [default: all]")]
        = PrepareOptions.limit,
        shard: Annotated[Optional[str], typer.Option(
            help="I/N: process every N-th chunk starting at I (1-based) [default: all chunks]")]
        = PrepareOptions.shard,
        strict: Annotated[bool, typer.Option("--strict", help="fail if images listed by the dataset are missing")]
        = PrepareOptions.strict,
        seed: Annotated[int, typer.Option(help="seed of the train/val/test assignment")] = PrepareOptions.seed,
        val_fraction: Annotated[float, typer.Option(help="share of groups for validation")]
        = PrepareOptions.val_fraction,
        test_fraction: Annotated[float, typer.Option(help="share for test (no official split)")]
        = PrepareOptions.test_fraction,
        max_side: Annotated[int, typer.Option(min=32, help="longer side images are scaled to for detection")]
        = PrepareOptions.max_side,
        as_json: Annotated[bool, typer.Option("--json", help="print the results as one JSON object")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    ) -> None:
        from agecli.progress import rich_progress
        from agecli.stages.prepare import prepare

        kwargs = dict(size=size, margin=margin, template=template, detector=detector, device=device,
                      workers=workers, limit=limit, shard=shard, strict=strict, seed=seed,
                      val_fraction=val_fraction, test_fraction=test_fraction, max_side=max_side)
        with rich_progress(quiet or as_json) as progress:
            results = prepare(dataset, root, run, progress=progress, **kwargs)
        if as_json:
            emit_json(results)
        elif not quiet:
            _summary(results)


def _summary(results: dict) -> None:
    from rich.console import Console

    console = Console(soft_wrap=True)
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
    dup = results.get("duplicates") or {}
    if dup.get("groups"):   # kept, each group in one split; conflicting labels are worth a look
        conflicts = f", {dup['conflicting_labels']} with conflicting labels" if dup.get("conflicting_labels") else ""
        console.print(f"duplicates: {dup['groups']} groups of identical images ({dup.get('files')} files, each "
                      f"group kept in one split){conflicts}")
    guessed = (results.get("chosen_by") or {}).get("largest_central", 0)
    if guessed and ("labels" not in results or "age" in results["labels"]):   # a label, but for whom?
        labels = "1 label" if guessed == 1 else f"{guessed} labels"
        console.print(f"{labels} went to the largest, most central of several faces in its image (no box said whose "
                      f"it is; chosen_by in {results['run']}/prepare/records.csv)")
    console.print(f"splits: {results.get('splits')}")
    for warning in results.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}")
    if results.get("warnings"):
        return   # no next step would work
    if "labels" not in results or "age" in results["labels"]:
        console.print(f"next: agecli train --run {results['run']}")
    else:   # nothing to train on: a teacher labels these faces
        console.print(f"next: agecli distill --run {results['run']} --teacher MODEL (the faces carry no labels)")
