"""`agecli train` and `agecli eval`: option parsing only; the work is in agecli.train and agecli.evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from agecli.options import TrainOptions

_D = TrainOptions()


def register(app: typer.Typer) -> None:
    @app.command("train", help="""Train an age model (a teacher, or any model) on a prepared run.

Writes RUN/train/NAME/: best.pt (lowest validation MAE) and last.pt (resumable), history.csv,
learning_curve.png, metrics.json (val, and test when the run has a test split) and a manifest.

\b
Examples:
  agecli train --arch resnet50 --pretrained imagenet --epochs 30
  agecli train --run runs/utkface --arch mobilenet --size 64 --epochs 5 --device cpu
  agecli train --arch resnet18 --encoding ordinal --gender --lr 1e-3 --patience 5
  agecli train --arch resnet50 --name resnet50 --resume          # continue after an interruption
  agecli train --run runs/adience --arch resnet18 --encoding groups --cv   # 5 official folds
  torchrun --nproc_per_node 2 -m agecli.cli train --arch resnet50 --device cuda   # DDP""")
    def train_command(
        arch: str = typer.Option(..., "--arch", help="backbone name or alias (see `agecli models`)"),
        run: Optional[Path] = typer.Option(None, "--run", help="run directory [default: the latest under runs/]"),
        name: Optional[str] = typer.Option(None, help="output folder under RUN/train/ [default: the arch]"),
        size: Optional[int] = typer.Option(None, help="input side in px [default: min(store size, backbone default)]"),
        encoding: str = typer.Option("ldae", help="regression | classification | ldae | ordinal | groups"),
        sigma: Optional[float] = typer.Option(None, help="ldae: width of the Gaussian label distribution (years)"),
        decode: Optional[str] = typer.Option(None, help="classification: expected | argmax"),
        loss: Optional[str] = typer.Option(None, help="regression: l1 | l2"),
        gender: bool = typer.Option(False, "--gender", help="add a gender head (multi-task)"),
        pretrained: Optional[str] = typer.Option(None, help="imagenet: torchvision's weights (online or cached)"),
        init: Optional[Path] = typer.Option(None, help="start from an agecli checkpoint or a state dict"),
        fold: Optional[int] = typer.Option(None, help="hold out this cross-validation fold as test"),
        cv: bool = typer.Option(False, "--cv", help="train one model per official fold; per-fold and mean+-std"),
        epochs: int = typer.Option(_D.epochs, help="passes over the training split"),
        time_limit: Optional[float] = typer.Option(None, help="minutes: end the schedule early to finish in time"),
        batch_size: int = typer.Option(_D.batch_size, help="faces per step (per process with torchrun)"),
        lr: float = typer.Option(_D.lr, help="peak learning rate (after warm-up; cosine decay)"),
        weight_decay: float = typer.Option(_D.weight_decay, help="weight decay (not on norms and biases)"),
        optimizer: str = typer.Option(_D.optimizer, help="adamw | sgd"),
        warmup_epochs: float = typer.Option(_D.warmup_epochs, help="linear warm-up length in epochs"),
        clip_grad: float = typer.Option(_D.clip_grad, help="max gradient norm (0 = off)"),
        patience: Optional[int] = typer.Option(None, help="early stop after N epochs without better val MAE"),
        no_augment: bool = typer.Option(False, "--no-augment", help="no flip/zoom/rotate/colour augmentation"),
        device: str = typer.Option(_D.device, help="cpu | cuda | cuda:N | auto (cuda when there is a GPU)"),
        amp: bool = typer.Option(_D.amp, "--amp/--no-amp", help="mixed precision on CUDA"),
        compile: bool = typer.Option(False, "--compile", help="torch.compile the model"),
        workers: int = typer.Option(_D.workers, help="batches prefetched in the background (0 = inline)"),
        threads: Optional[int] = typer.Option(None, help="torch CPU threads [default: torch's choice]"),
        seed: int = typer.Option(_D.seed, help="seed for init, shuffling and augmentation"),
        resume: bool = typer.Option(False, "--resume", help="continue RUN/train/NAME/last.pt"),
        max_batches: Optional[int] = typer.Option(None, help="cap steps per epoch (quick trials)"),
        as_json: bool = typer.Option(False, "--json", help="print the results as one JSON object"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ) -> None:
        from agecli.errors import AgecliError
        from agecli.progress import log, rich_progress
        from agecli.stages.train import cross_validate, train

        options = TrainOptions(
            epochs=epochs, time_limit=time_limit, batch_size=batch_size, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
            warmup_epochs=warmup_epochs, clip_grad=clip_grad or None, patience=patience, device=device, amp=amp,
            compile=compile, augment=not no_augment, seed=seed, workers=workers, threads=threads, resume=resume,
            max_batches=max_batches)
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
            return
        if cv:
            parts = [f"{k} {v['mean']:.3f} +- {v['std']:.3f}" for k, v in results.items() if isinstance(v, dict) and "mean" in v]
            log(f"cross-validation over {len(results['folds'])} folds: " + ", ".join(parts) + f" -> {results.get('dir')}",
                quiet)
            return
        val, test = results.get("val") or {}, results.get("test") or {}
        line = f"best epoch {results['best_epoch']}: val MAE {val.get('mae', float('nan')):.2f}"
        if test:
            line += f", test MAE {test.get('mae', float('nan')):.2f}"
        log(f"{line} in {results['seconds']:.0f} s ({results['train_images_per_s'] or 0:.0f} img/s) -> {results['dir']}",
            quiet)
        log(f"next: agecli eval --model {results['best']} --run {results['run']}", quiet)

    @app.command("eval", help="""Score a checkpoint on a split of a run: MAE, RMSE, CS(1..10), epsilon-error,
Adience exact/1-off, gender accuracy and a bias table (MAE per decade, gender, race).

Writes RUN/eval/MODEL/predictions.csv, metrics.json and bias.csv. A model trained on another
run is fine (cross-dataset); a warning says when the face alignment differs.

\b
Examples:
  agecli eval --model runs/utkface/train/resnet50/best.pt
  agecli eval --model best.pt --run runs/fgnet --split all --json
  agecli eval --model best.pt --split val --device cuda""")
    def eval_command(
        model: Path = typer.Option(..., "--model", "-m", help="agecli checkpoint (.pt)"),
        run: Optional[Path] = typer.Option(None, "--run", help="run directory [default: the latest under runs/]"),
        split: str = typer.Option("test", help="train | val | test | all (every labelled face)"),
        device: str = typer.Option("cpu", help="cpu | cuda"),
        batch_size: int = typer.Option(256, help="faces per forward pass"),
        name: Optional[str] = typer.Option(None, help="output folder under RUN/eval/ [default: from the model path]"),
        as_json: bool = typer.Option(False, "--json", help="print the results as one JSON object"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ) -> None:
        from agecli.stages.evaluate import evaluate
        from agecli.progress import log, rich_progress

        with rich_progress(quiet or as_json) as progress:
            results = evaluate(model, run, split, device=device, batch_size=batch_size, name=name, progress=progress)
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
    table = Table(title=f"{results['model']} on {results['run']} ({results['split']}, {m.get('n', 0)} faces)")
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
    console = Console()
    console.print(table)
    console.print(bias)
    console.print(f"-> {results['dir']}")
