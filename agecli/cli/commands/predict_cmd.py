"""`agecli predict`: option parsing and printing; the work is in agecli.stages.predict."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("predict", help="""Estimate the age (and gender) of every face in photos, folders and videos.

Faces are detected (MTCNN) and aligned exactly as the model's checkpoint says. Writes one
row per face (file, frame, box, age, gender, confidence) to --out (.json or .csv) and, with
--annotate, copies of the photos / videos with boxes and ages drawn on them. Photos without
a face are reported, not errors. The model may be an agecli checkpoint (.pt) or a file
written by `agecli export` (.onnx, .torchscript).

\b
Examples:
  agecli predict --model runs/utkface/distill/mobilenet/best.pt photo.jpg
  agecli predict -m student.onnx ../shared/data/photos --annotate annotated/ --out faces.csv
  agecli predict -m best.pt clip.mp4 --smooth 15 --annotate out/ --every 2
  agecli predict -m best.pt photos/ --json > faces.json""")
    def predict_command(
        paths: List[Path] = typer.Argument(..., help="photos, videos or folders (searched recursively)"),
        model: Path = typer.Option(..., "--model", "-m", help="agecli checkpoint or agecli export (.onnx)"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the rows to this .json or .csv file"),
        annotate: Optional[Path] = typer.Option(None, "--annotate", help="folder for annotated photos / videos"),
        smooth: int = typer.Option(1, help="videos: average a face's age over its last N frames (IoU tracking)"),
        every: int = typer.Option(1, help="videos: look at every N-th frame"),
        min_face: float = typer.Option(0.03, help="smallest face, as a fraction of the image's shorter side"),
        max_side: int = typer.Option(960, help="detect on a copy scaled to at most this many pixels"),
        min_score: float = typer.Option(0.9, help="minimum detection probability"),
        device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | auto (cuda when there is a GPU)"),
        as_json: bool = typer.Option(False, "--json", help="print the results as one JSON object"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ) -> None:
        from agecli.stages.predict import predict
        from agecli.progress import rich_progress

        with rich_progress(quiet or as_json) as progress:
            result = predict(paths, model, device=device, annotate=annotate, smooth=smooth, every=every,
                             min_face_fraction=min_face, max_side=max_side, min_score=min_score, out=out,
                             progress=progress)
        if as_json:
            from agecli.cli.commands import emit_json

            emit_json(result)
            return
        _print(result, quiet, annotate)


def _print(result: dict, quiet: bool, annotate: Path | None) -> None:
    """Notes, a table of the faces (first 200), photos without a face, and where files went."""
    from rich.console import Console

    console = Console(stderr=True)
    for note in result["notes"]:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if not quiet:
        Console().print(_table(result))
    if len(result["rows"]) > 200:
        console.print(f"... {len(result['rows']) - 200} more rows (use --out or --json)")
    for path in result["no_face"]:
        console.print(f"[yellow]no face found[/] in {path}", highlight=False)
    if result["skipped"]:
        console.print(f"skipped {len(result['skipped'])} file(s) that are neither images nor videos")
    if result["annotated"]:
        console.print(f"annotated copies in {annotate}/ ({len(result['annotated'])} files)", highlight=False)
    if result.get("out"):
        console.print(f"wrote {result['out']}", highlight=False)


def _table(result: dict):
    from rich.table import Table

    table = Table(title=f"{result['faces']} face(s) in {result['files']} file(s)")
    for col in ("file", "frame", "track", "box", "age", "gender", "confidence"):
        table.add_column(col)
    for r in result["rows"][:200]:
        table.add_row(Path(r["file"]).name, "" if r["frame"] is None else str(r["frame"]),
                      "" if r["track"] is None else str(r["track"]), " ".join(f"{v:.0f}" for v in r["box"]),
                      f"{r['age']:.1f}", r["gender"] or "-" if r["female_prob"] is None
                      else f"{r['gender']} ({max(r['female_prob'], 1 - r['female_prob']):.2f})",
                      f"{r['confidence']:.3f}")
    return table
