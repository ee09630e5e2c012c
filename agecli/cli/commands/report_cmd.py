"""`agecli report`: option parsing only; the work is in `agecli.stages.report`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("report", help=HELP)(report_command)


HELP = """Write RUN/report.md: every stage's tables and plots, readable on its own.

Prepared faces (counts per split, rejects, alignment), each trained and distilled model
(results, history, learning curves), evaluations and the benchmark (table, speed-ups,
robustness, plots). `agecli bench` writes it at its end too.

\b
Examples:
  agecli report                    # the latest run under runs/
  agecli report --run runs/utkface"""


def report_command(
    run: Optional[Path] = typer.Option(None, "--run", help="run directory [default: the latest under runs/]"),
    as_json: bool = typer.Option(False, "--json", help="print the report path as one JSON object"),
) -> None:
    from agecli.stages.report import write_report

    path = write_report(run)
    if as_json:
        from agecli.cli.commands import emit_json

        emit_json({"report": str(path)})
        return
    typer.echo(f"wrote {path}", err=True)
