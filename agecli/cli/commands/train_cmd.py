"""`agecli train` and `agecli eval`: option parsing only; the work is in agecli.stages.train and
agecli.stages.evaluate. The training loop's options and their defaults come from
agecli.options.TrainOptions (see agecli.cli.params)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from agecli.cli.params import (TRAINING, Arch, Device, Encoding, Gender, Init, Json, Name, Pretrained, Quiet, Run,
                               Size, with_options)
from agecli.options import TrainOptions

TRAIN_HELP = """Train an age model (a teacher, or any model) on a prepared run.

Writes RUN/train/NAME/: best.pt (lowest validation MAE) and last.pt (resumable), history.csv,
learning_curve.png, metrics.json (val, and test when the run has a test split) and a manifest.

\b
Examples:
  agecli train --arch resnet50 --pretrained imagenet --epochs 30
  agecli train --run runs/utkface --arch mobilenet --size 64 --epochs 5 --device cpu
  agecli train --arch resnet18 --encoding ordinal --gender --lr 1e-3 --patience 5
  agecli train --arch resnet50 --name resnet50 --resume          # continue after an interruption
  agecli train --run runs/adience --arch resnet18 --encoding groups --cv   # 5 official folds
  torchrun --nproc_per_node 2 -m agecli.cli train --arch resnet50 --device cuda   # DDP"""

EVAL_HELP = """Score a checkpoint on a split of a run: MAE, RMSE, CS(1..10), epsilon-error,
Adience exact/1-off, gender accuracy and a bias table (MAE per decade, gender, race).

Writes RUN/eval/MODEL/predictions.csv, metrics.json and bias.csv. A model trained on another
run is fine (cross-dataset); a warning says when the face alignment differs.

\b
Examples:
  agecli eval --model runs/utkface/train/resnet50/best.pt
  agecli eval --model best.pt --run runs/fgnet --split all --json
  agecli eval --model best.pt --split val --device cuda"""


def register(app: typer.Typer) -> None:
    app.command("train", help=TRAIN_HELP)(train_command)
    app.command("eval", help=EVAL_HELP)(eval_command)


@with_options(TrainOptions, TRAINING, into="options")
def train_command(
    arch: Arch,
    run: Run = None,
    name: Name = None,
    size: Size = None,
    encoding: Encoding = "ldae",
    sigma: Annotated[Optional[float], typer.Option(
        min=0.5, max=30, help="ldae: width of the Gaussian label distribution (years) [default: 2]")] = None,
    decode: Annotated[Optional[Literal["expected", "argmax"]], typer.Option(
        help="classification: how outputs become an age [default: expected]")] = None,
    loss: Annotated[Optional[Literal["l1", "l2"]], typer.Option(help="regression: the loss [default: l1]")] = None,
    gender: Gender = False,
    pretrained: Pretrained = None,
    init: Init = None,
    fold: Annotated[Optional[int], typer.Option(
        help="hold out this cross-validation fold as test [default: none, the run's own test split]")] = None,
    cv: Annotated[bool, typer.Option("--cv", help="train one model per official fold; per-fold and mean+-std")] = False,
    as_json: Json = False,
    quiet: Quiet = False,
    *,
    options: TrainOptions,
) -> None:
    from agecli.errors import AgecliError
    from agecli.progress import rich_progress
    from agecli.stages.train import cross_validate, train

    kwargs = dict(size=size, encoding=encoding, sigma=sigma, decode=decode, loss=loss, gender=gender,
                  pretrained=pretrained, init=init, options=options)
    with rich_progress(quiet or as_json) as progress:
        if cv:
            if fold is not None:
                raise AgecliError("--cv trains one model per fold itself; drop --fold (or drop --cv to hold out one fold).")
            results = cross_validate(run, arch=arch, name=name, progress=progress, **kwargs)
        else:
            results = train(run, arch=arch, name=name, fold=fold, progress=progress, **kwargs)
    if as_json:
        from agecli.cli.commands import emit_json

        emit_json(results)
    elif cv:
        _print_cv(results, quiet)
    else:
        _print_train(results, quiet)


def _print_cv(results: dict, quiet: bool) -> None:
    from agecli.progress import log

    parts = [f"{k} {v['mean']:.3f} +- {v['std']:.3f}" for k, v in results.items() if isinstance(v, dict) and "mean" in v]
    log(f"cross-validation over {len(results['folds'])} folds: " + ", ".join(parts) + f" -> {results.get('dir')}",
        quiet)


def _print_train(results: dict, quiet: bool) -> None:
    from agecli.progress import log

    val, test = results.get("val") or {}, results.get("test") or {}
    line = f"best epoch {results['best_epoch']}: val MAE {val.get('mae', float('nan')):.2f}"
    if test:
        line += f", test MAE {test.get('mae', float('nan')):.2f}"
    log(f"{line} in {results['seconds']:.0f} s ({results['train_images_per_s'] or 0:.0f} img/s) -> {results['dir']}",
        quiet)
    if results.get("labelled_fraction", 1.0) < 1:
        log(f"trained on {results['labelled_faces']} labelled faces; {results['unlabelled_faces']} left out "
            f"(--labelled-fraction {results['labelled_fraction']:g})", quiet)
    log(f"next: agecli eval --model {results['best']} --run {results['run']}", quiet)


def eval_command(
    model: Annotated[Path, typer.Option("--model", "-m", help="agecli checkpoint (.pt), or default")],
    run: Run = None,
    split: Annotated[Literal["train", "val", "test", "all"], typer.Option(
        help="the split to score; all: every labelled face")] = "test",
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="faces per forward pass")] = 256,
    name: Annotated[Optional[str], typer.Option(
        help="output folder under RUN/eval/ [default: from the model path]")] = None,
    mirror: Annotated[bool, typer.Option(
        "--mirror", help="score each face as the mean of the answers on it and on its mirror image "
                         "(twice the cost; what a teacher gives under distill --teacher-mirror)")] = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    from agecli.progress import log, rich_progress
    from agecli.stages.evaluate import evaluate

    with rich_progress(quiet or as_json) as progress:
        results = evaluate(model, run, split, device=device, batch_size=batch_size, name=name, mirror=mirror,
                           progress=progress)
    for warning in results["warnings"]:
        log(f"[yellow]warning:[/] {warning}", False)
    if as_json:
        from agecli.cli.commands import emit_json

        emit_json(results)
        return
    if not quiet:
        _print_metrics(results)


def _print_metrics(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = results["metrics"]
    mirrored = ", each face and its mirror image" if results.get("mirror") else ""
    table = Table(title=f"{results['model']} on {results['run']} ({results['split']}, {m.get('n', 0)} faces{mirrored})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("mae", "rmse", "cs1", "cs5", "cs10", "epsilon_error", "group_exact", "group_1off", "gender_accuracy"):
        if key in m:
            table.add_row(key, f"{m[key]:.3f}")
    bias = Table(title="MAE by group (bias)")
    for col in ("by", "value", "n", "mae"):
        bias.add_column(col)
    for row in results["bias"]:
        bias.add_row(row["by"], str(row["value"]), str(row["n"]), f"{row['mae']:.2f}")
    console = Console(soft_wrap=True)
    console.print(table)
    console.print(bias)
    console.print(f"-> {results['dir']}")
