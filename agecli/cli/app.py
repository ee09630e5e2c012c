"""The `agecli` command: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import importlib
import inspect
import re
import signal
import sys
import typing

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
    # the name is what a user copies into --arch: never cut it, even in an 80-column terminal
    table.add_column("name", min_width=max(len(r["name"]) for r in rows), no_wrap=True)
    for col in ("aliases", "params (M)", "default size", "family"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], ", ".join(r["aliases"]), f"{r['params_m']:.2f}", str(r["default_size"]), r["family"])
    Console(soft_wrap=True).print(table)


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f".commands.{_name}", __package__)
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__package__}.commands.{_name}":
            raise
        continue
    _module.register(app)


_DEFAULT_HINT = re.compile(r"\s*\[default: ([^\]]*)\]")


def show_defaults(typer_app: typer.Typer) -> None:
    """Help text passes through rich markup, which takes `[default: ...]` for a style tag and drops
    it. A `[default: X]` hint in an option's help (how options whose default is None say what
    that means) becomes the default the help shows; other brackets are escaped."""
    for command in typer_app.registered_commands:
        for info in _parameter_infos(command.callback):
            text = info.help or ""
            hint = _DEFAULT_HINT.search(text)
            if hint and not isinstance(info.show_default, str):
                info.show_default = hint.group(1)
                text = text[:hint.start()] + text[hint.end():]
            info.help = re.sub(r"(?<!\\)\[", r"\\[", text) if text else info.help


def _parameter_infos(callback) -> list:
    """The typer Option/Argument objects of a command function (as defaults or in Annotated)."""
    hints = typing.get_type_hints(callback, include_extras=True)
    # string annotations (`from __future__ import annotations`) would be evaluated afresh, into
    # new Option objects, each time they are read: keep the objects read here, for typer too
    callback.__annotations__ = {**getattr(callback, "__annotations__", {}), **hints}
    found = []
    for parameter in inspect.signature(callback).parameters.values():
        if isinstance(parameter.default, typer.models.ParameterInfo):
            found.append(parameter.default)
        annotation = hints.get(parameter.name)
        found.extend(m for m in getattr(annotation, "__metadata__", ()) if isinstance(m, typer.models.ParameterInfo))
    return found


show_defaults(app)


# --------------------------------------------------------------------------- interrupts
_received: list[int] = []  # the terminating signal, when one arrived


def _on_signal(signum: int, frame) -> None:
    """SIGTERM / SIGHUP unwind like Ctrl-C (KeyboardInterrupt), so the running stage is marked
    interrupted in its manifest, its lock released and half-written files removed."""
    _received.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)  # the manifest's error names the signal


def _catch_signals() -> None:
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _on_signal)


def _interrupted() -> None:
    """Exit as a process killed by the signal would be counted (128 + its number: 130 for Ctrl-C,
    143 for SIGTERM), saying what happened and how to go on."""
    signum = _received[0] if _received else signal.SIGINT
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), "")
    if command in ("predict", "export"):   # no stage, no manifest: say what was (not) kept
        typer.echo(f"{what}; {command} writes its results (--out, an annotated video) only when it finishes, "
                   "so nothing partial was kept: run it again.", err=True)
    else:
        typer.echo(f"{what}; the running stage is marked interrupted in its manifest. prepare, bench and "
                   "`agecli run` continue where they stopped when run again; train and distill continue with "
                   "--resume --name NAME.", err=True)
    sys.exit(128 + int(signum))


def main() -> None:
    _catch_signals()
    try:
        code = app(standalone_mode=False)
    except AgecliError as exc:
        from rich.console import Console
        from rich.markup import escape

        # escaped: rich would drop a message's own [brackets] as markup
        # soft-wrapped, as every agecli console: a hard wrap would cut paths in two in logs and copied text
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        _interrupted()
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        # usage errors (typer's vendored click) carry their own message and exit code
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if code == INTERRUPTED:  # typer turns a KeyboardInterrupt inside a command into this return value
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)


INTERRUPTED = 130


if __name__ == "__main__":
    main()
