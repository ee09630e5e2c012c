"""The `agecli` command: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import importlib
import sys

import typer

from agecli import __version__
from agecli.errors import AgecliError

app = typer.Typer(
    name="agecli",
    help=(
        "Turn face photos into fast, accurate age (and gender) estimators.\n\n"
        "Stages write into a run directory (default runs/<dataset>), each reading the last:\n\n"
        "  agecli prepare utkface --root ~/data/UTKFace --detector none\n\n"
        "  agecli train --arch resnet50\n\n"
        "  agecli distill --teacher runs/utkface/train/resnet50/best.pt --student mobilenet\n\n"
        "  agecli bench --device cpu"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# One module per stage; a module that is not written yet is simply absent from the CLI.
COMMAND_MODULES = ("prepare_cmd", "train_cmd", "distill_cmd", "bench_cmd", "export_cmd",
                   "predict_cmd", "report_cmd", "run_cmd")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"agecli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the agecli version and exit.")) -> None:
    """Turn face photos into fast, accurate age (and gender) estimators."""


@app.command("models")
def models_cmd(json_out: bool = typer.Option(False, "--json", help="Print the table as JSON.")) -> None:
    """List the backbones (with aliases, parameters and default input size).

    Example: agecli models
    """
    from agecli.cli.commands import emit_json
    from agecli.modeling.backbones import describe_backbones

    rows = describe_backbones()
    if json_out:
        emit_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="agecli backbones")
    for col in ("name", "aliases", "params (M)", "default size", "family"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], ", ".join(r["aliases"]), f"{r['params_m']:.2f}", str(r["default_size"]), r["family"])
    Console().print(table)


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f".commands.{_name}", __package__)
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__package__}.commands.{_name}":
            raise
        continue
    _module.register(app)


def main() -> None:
    try:
        app(standalone_mode=False)
    except AgecliError as exc:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted; re-run the same command to resume.", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        # usage errors (typer's vendored click) carry their own message and exit code
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
