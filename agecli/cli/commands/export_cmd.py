"""`agecli export`: option parsing and printing; the work is in agecli.stages.export."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("export", help="""Export a checkpoint to ONNX or TorchScript, checked against PyTorch.

The file takes float32 images (N, 3, S, S), RGB in [0, 1], faces aligned as the checkpoint
says (normalisation is inside), with a dynamic batch axis, and returns age (years),
female_prob (with a gender head) and age_raw (the head's outputs). The checkpoint's
ModelSpec is kept in the file's metadata. A parity check on real aligned faces of the
run (test split) prints the largest age difference and the MAE difference, and fails
above --tolerance years. --quantize int8 adds an int8 ONNX copy (weights per channel,
activation scales calibrated on 256 faces of the run's val split) and reports its MAE cost
and speed-up. The metadata key agecli_inference says in numbers how to
crop, feed and decode the model without agecli (docs/onnx.md). An existing --out is never
replaced without --force, the checkpoint never, and a failed parity check writes nothing.

\b
Examples:
  agecli export --model default                      # the model shipped with agecli -> ./default.onnx
  agecli export --model runs/utkface/distill/mobilenet/best.pt
  agecli export --model best.pt --format torchscript --out student.torchscript
  agecli export --model best.pt --quantize int8 --run runs/utkface""")
    def export_command(
        model: str = typer.Option(..., "--model", "-m", help="agecli checkpoint (.pt), or `default`"),
        format: str = typer.Option("onnx", "--format", "-f", help="onnx | torchscript"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="output file [default: beside the checkpoint; "
                                                                   "./default.onnx for `default`]"),
        force: bool = typer.Option(False, "--force", help="replace an existing --out"),
        quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: a calibrated int8 copy (ONNX, CPU) [default: none, float32]"),
        run: Optional[Path] = typer.Option(None, "--run", help="run whose faces the parity check uses "
                                                              "[default: the model's own run]"),
        tolerance: float = typer.Option(0.05, min=0.0, help="largest allowed |age difference| in years vs PyTorch"),
        as_json: bool = typer.Option(False, "--json", help="print the results as one JSON object"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ) -> None:
        from agecli.stages.export import export
        from agecli.progress import rich_progress

        with rich_progress(quiet or as_json) as progress:
            result = export(model, format, out, quantize=quantize, run=run, tolerance=tolerance, force=force,
                            progress=progress)
        if as_json:
            from agecli.cli.commands import emit_json

            emit_json(result)
            return
        _print(result)


def _print(result: dict) -> None:
    """The export's file, its parity with PyTorch, the int8 copy's cost and speed, the next command."""
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    p = result["parity"]
    mae = "" if p["mae_torch"] is None else (f", MAE torch {p['mae_torch']:.3f} vs export {p['mae_export']:.3f} "
                                              f"(diff {p['mae_diff']:.2e})")
    console.print(f"[green]exported[/] {result['path']} ({result['bytes'] / 2**20:.1f} MB, {result['format']})",
                  highlight=False)
    console.print(f"parity on {p['faces']} real faces ({p['split']} split of {p['run']}): max |age diff| "
                  f"{p['max_abs_age']:.2e} years (tolerance {p['tolerance']}){mae}", highlight=False)
    q = result.get("quantized")
    if q:
        # without labelled faces there is no MAE cost: the largest change of an age is what is known then
        cost = (f", ages move by up to {q['max_abs_age_vs_fp32']:.2f} years (no labelled faces to score; give --run)"
                if q["mae_cost"] is None else
                f", MAE {q['mae_fp32']:.3f} -> {q['mae_int8']:.3f} ({q['mae_cost']:+.3f})")
        console.print(f"int8: {q['path']} ({q['bytes'] / 2**20:.1f} MB vs {q['fp32_bytes'] / 2**20:.1f} MB){cost}; "
                      f"batch 1 {q['latency_ms_fp32']:.2f} -> {q['latency_ms_int8']:.2f} ms "
                      f"({q['speedup_batch1']:.2f}x), batch {q['batch']} {q['speedup_batch']:.2f}x, "
                      f"{q['threads']} threads", highlight=False)
    console.print(f"next: {result['next']}", highlight=False)
