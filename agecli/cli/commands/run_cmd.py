"""`agecli run RECIPE` (every stage from one YAML file) and `agecli quickstart`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from agecli.cli.commands import emit_json
from agecli.cli.params import complete_devices


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("quickstart")(quickstart_cmd)


def run_cmd(
    recipe: str = typer.Argument(..., metavar="RECIPE",
                                 help="A recipe YAML file, or the name of a bundled one (utkface, adience, ...)."),
    root: Optional[Path] = typer.Option(None, "--root", help="The dataset folder the recipe's prepare stage reads "
                                                             "[default: the recipe's root: key]."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run directory [default: runs/<recipe name>]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate every option and print the plan; run nothing."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                        help="Override a recipe value: section.key=v, section.ENTRY.key=v "
                                             "(ENTRY: a name or index), or section.key=v for every entry."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan and per-step results as one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or status lines."),
    jobs: int = typer.Option(1, "--jobs", min=1, metavar="N",
                             help="Run up to N steps of one section at once, each as a child process logging to "
                                  "RUN/logs/ (for a GPU one small model leaves idle)."),
    only: list[str] = typer.Option([], "--step", metavar="LABEL",
                                   help="Run only this step (e.g. train/teacher) or section (e.g. train); repeatable."),
    no_state: bool = typer.Option(False, "--no-state", hidden=True,
                                  help="Do not write RUN/recipe-state.json (a --jobs child; its parent records it)."),
) -> None:
    """Run every stage of a recipe (prepare, train, cross_validate, distill, eval, bench, report) into one run directory.

    A recipe's keys are exactly the keyword arguments of the stages' library functions; all of
    them are checked before anything runs. Completed steps are skipped, so re-running a recipe
    resumes it. The recipe is copied into the run as recipe.yaml.

    --step picks steps to run (the rest show as "not selected"). --jobs N runs the steps of
    each section N at a time as `python -m agecli run RUN/logs/recipe-HASH.yaml --step LABEL` (this
    recipe, frozen), each logging to RUN/logs/LABEL.log; sections still run in order, and a
    failure stops the run after the running steps of its section finish.

    Examples:

      agecli run recipes/utkface.yaml --root ../shared/data/utkface/UTKFace

      agecli run adience --root ~/data/adience --dry-run

      agecli run utkface --root DATA --run runs/try --set prepare.limit=500 --set train.epochs=1

      agecli run utkface --root DATA --step train --jobs 3 --set train.device=cuda
    """
    from agecli.progress import rich_progress
    from agecli.recipes import load_recipe, run_recipe

    loaded = load_recipe(recipe, overrides)
    run_dir = run or Path("runs") / (loaded.path.stem if loaded.path else "recipe")
    selection = only or None
    if dry_run:
        result = run_recipe(loaded, run_dir, root, dry_run=True, only=selection)
    else:
        with rich_progress(quiet or json_out) as progress:
            result = run_recipe(loaded, run_dir, root, progress=progress, quiet=quiet or json_out, jobs=jobs,
                                only=selection, record_state=not no_state)
    if json_out:
        emit_json(result)
        return
    _print_steps(result, loaded.description)


def _print_steps(result: dict[str, Any], description: str) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"{'plan' if result['dry_run'] else 'ran'}: {result['recipe']} -> {result['run']}"
    table = Table(title=title, caption=description.splitlines()[0] if description else None)
    for column in ("step", "call", "action", "options" if result["dry_run"] else "seconds"):
        table.add_column(column, overflow="fold")
    for row in result["steps"]:
        last = (", ".join(f"{k}={v}" for k, v in row["options"].items()) if result["dry_run"]
                else str(row.get("seconds", "-")))
        table.add_row(row["step"], row["call"], row["action"], last)
    Console(soft_wrap=True).print(table)
    if result["dry_run"]:
        Console(soft_wrap=True).print("valid; run it without --dry-run.")


def quickstart_cmd(
    run: Path = typer.Option(Path("runs/quickstart"), "--run", help="Run directory."),
    device: str = typer.Option("auto", "--device", autocompletion=complete_devices,
                               help="auto (cuda when torch sees a GPU, else cpu) | cpu | cuda | cuda:N."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1,
                                         help="Student epochs [default: the quickstart recipe's]."),
    json_out: bool = typer.Option(False, "--json", help="Print the results (bench table included) as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or status lines."),
) -> None:
    """Run the whole pipeline on the photos bundled with agecli, in a couple of minutes, offline.

    prepare (MTCNN finds and aligns the faces in the bundled photos) -> the bundled CC0
    dlib age model labels them -> distill (pseudo-labels, Greco et al. 2021) into a
    MobileNetV3-small student -> bench (student vs the CC0 reference: size, FLOPs, latency,
    throughput, and, the faces being unlabelled, mae_vs_reference = agreement with the CC0
    model) -> report. Prints the bench table and the report's path. Re-running skips what
    is complete.

    Examples:

      agecli quickstart

      agecli quickstart --run runs/qs2 --json
    """
    from agecli.progress import rich_progress
    from agecli.recipes.quickstart import quickstart

    with rich_progress(quiet or json_out) as progress:
        result = quickstart(run, device=device, epochs=epochs, progress=progress, quiet=quiet or json_out)
    if json_out:
        emit_json(result)
        return
    from rich.console import Console

    console = Console(soft_wrap=True)
    if result.get("bench"):
        from agecli.cli.commands.bench_cmd import print_table

        print_table(dict(result["bench"], report=result.get("report") or ""), console=console)
    elif result.get("table"):
        console.print(_bench_table(result["table"]))
    if result.get("report"):
        console.print(f"report: {result['report']}")
    console.print(f"run: {result['run']}  (next: agecli predict --model {result.get('student', 'STUDENT')} PHOTO)")


def _bench_table(rows: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title="quickstart bench")
    columns = list(rows[0]) if rows else []
    for column in columns:
        table.add_column(str(column))
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    return table


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)
