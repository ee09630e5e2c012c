"""Command-line parameters shared by the commands, as typer `Annotated` types.

Options dataclasses (agecli.options) are the one source of their defaults: `with_options`
gives a command one option per field named in a table below (TRAINING for TrainOptions,
DISTILLATION for DistillOptions), with the dataclass's default, and hands the command the
dataclass built from them, validated by it:

    @with_options(TrainOptions, TRAINING, into="options")
    def train_command(arch: Arch, run: Run = None, *, options: TrainOptions) -> None: ...

A new field needs one line in its table and shows up in every command that takes it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer

from agecli.options import DEVICES, ENCODING_NAMES, METHODS, OPTIMIZERS

# Choices are typed as Literal (one value) or a str Enum (a repeatable option), so typer
# validates and completes them; `plain` turns Enum members back into their strings.
MethodChoice = enum.Enum("MethodChoice", {m: m for m in METHODS}, type=str)


def plain(value: Any) -> Any:
    """A choice as the library takes it: an Enum member's string, a list of them as strings."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def complete_devices(incomplete: str) -> list[str]:
    return [d for d in (*DEVICES, "cuda:0", "cuda:1") if d.startswith(incomplete)]


def complete_arch(incomplete: str) -> list[str]:
    """Backbone names and aliases (imports the model registry only when completing)."""
    from agecli.modeling.backbones import describe_backbones

    names = [n for row in describe_backbones() for n in (row["name"], *row["aliases"])]
    return sorted(n for n in set(names) if n.startswith(incomplete))


# --------------------------------------------------------------------------- what to train on, and how to report
Run = Annotated[Optional[Path], typer.Option("--run", help="run directory [default: the latest under runs/]")]
Name = Annotated[Optional[str], typer.Option("--name", help="output folder name, a plain name such as resnet50-b "
                                                            "[default: from the model]")]
Size = Annotated[Optional[int], typer.Option(
    "--size", min=16, max=1024, help="input side in px, 16..1024 [default: min(store size, backbone default)]")]
Arch = Annotated[str, typer.Option("--arch", autocompletion=complete_arch,
                                   help="backbone name or alias (see `agecli models`)")]
Encoding = Annotated[Literal[ENCODING_NAMES], typer.Option(  # type: ignore[valid-type]
    "--encoding", help="how the head encodes an age")]
Gender = Annotated[bool, typer.Option("--gender", help="add a gender head (multi-task, on gender-labelled faces)")]
Pretrained = Annotated[Optional[str], typer.Option(
    "--pretrained", autocompletion=lambda incomplete: [p for p in ("imagenet", "dlib") if p.startswith(incomplete)],
    help="imagenet: torchvision's weights (online or cached); dlib: the CC0 dlib weights "
         "[default: none, random initial weights]")]
Init = Annotated[Optional[Path], typer.Option("--init", help="start from an agecli checkpoint or a state dict "
                                                            "[default: none]")]
Device = Annotated[str, typer.Option("--device", autocompletion=complete_devices,
                                     help="auto (cuda when torch sees a GPU, else cpu) | cpu | cuda | cuda:N")]
Json = Annotated[bool, typer.Option("--json", help="print the results as one JSON object")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")]


def _option(*decls: str, panel: str, **kwargs: Any) -> typer.models.OptionInfo:
    return typer.Option(*decls, rich_help_panel=panel, **kwargs)


# --------------------------------------------------------------------------- TrainOptions
_LOOP = "Training loop"
TRAINING: dict[str, Any] = {
    "epochs": Annotated[int, _option(panel=_LOOP, help="passes over the training split")],
    "time_limit": Annotated[Optional[float], _option(panel=_LOOP, help="minutes: end the schedule early to finish "
                                                                       "in time [default: no limit]")],
    "batch_size": Annotated[int, _option(panel=_LOOP, help="faces per step (per process with torchrun)")],
    "lr": Annotated[float, _option(panel=_LOOP, help="peak learning rate (after warm-up; cosine decay)")],
    "weight_decay": Annotated[float, _option(panel=_LOOP, help="weight decay (not on norms and biases)")],
    "optimizer": Annotated[Literal[OPTIMIZERS], _option(panel=_LOOP, help="the optimiser")],  # type: ignore
    "warmup_epochs": Annotated[float, _option(panel=_LOOP, help="linear warm-up length in epochs")],
    "clip_grad": Annotated[Optional[float], _option(panel=_LOOP, help="max gradient norm (0 = off)")],
    "patience": Annotated[Optional[int], _option(panel=_LOOP, help="early stop after N epochs without better val MAE "
                                                                   "[default: never]")],
    "augment": Annotated[bool, _option("--augment/--no-augment", panel=_LOOP,
                                       help="flip/zoom/rotate/colour augmentation")],
    "robust_augment": Annotated[float, _option(panel=_LOOP, help="share of training faces also degraded by noise, "
                                                                 "blur or JPEG, mixed AugMix-style (0 = off)")],
    "labelled_fraction": Annotated[float, _option(panel=_LOOP, help="keep the labels of this share of the training "
                                                                    "faces, the same faces in every stage; distill's "
                                                                    "teacher labels the rest")],
    "device": Annotated[str, _option(panel=_LOOP, autocompletion=complete_devices,
                                     help="auto (cuda when torch sees a GPU, else cpu) | cpu | cuda | cuda:N")],
    "amp": Annotated[bool, _option("--amp/--no-amp", panel=_LOOP, help="mixed precision on CUDA")],
    "channels_last": Annotated[bool, _option("--channels-last/--no-channels-last", panel=_LOOP,
                                             help="NHWC memory format on CUDA")],
    "compile": Annotated[bool, _option("--compile/--no-compile", panel=_LOOP, help="torch.compile the model")],
    "workers": Annotated[int, _option(panel=_LOOP, help="batches prefetched in the background (0 = inline)")],
    "threads": Annotated[Optional[int], _option(panel=_LOOP, help="torch CPU threads [default: torch's choice]")],
    "seed": Annotated[int, _option(panel=_LOOP, help="seed for init, shuffling and augmentation")],
    "resume": Annotated[bool, _option("--resume", panel=_LOOP, help="continue the NAME folder from its last.pt")],
    "val_batch_size": Annotated[int, _option(panel=_LOOP, help="faces per step when validating and scoring")],
    "max_batches": Annotated[Optional[int], _option(panel=_LOOP, help="cap steps per epoch (quick trials) "
                                                                      "[default: all]")],
    "precise_bn_batches": Annotated[int, _option(panel=_LOOP, help="re-estimate BatchNorm statistics on this many "
                                                                   "un-augmented batches before validating")],
    "ema": Annotated[float, _option(panel=_LOOP, help="validate and keep (best.pt) a moving average of the weights "
                                                      "with this decay per step, e.g. 0.998 [0: off]")],
    "layer_decay": Annotated[float, _option(panel=_LOOP, help="layer-wise lr decay for fine-tuning: each backbone "
                                                              "layer learns at this times the rate of the one above "
                                                              "it, the heads at --lr, e.g. 0.7 [1: off]")],
}

# --------------------------------------------------------------------------- DistillOptions
_KD = "Distillation"
DISTILLATION: dict[str, Any] = {
    "method": Annotated[list[MethodChoice], _option("--method", panel=_KD,  # type: ignore[valid-type]
                                                    help="repeat to combine (--method soft --method hint)")],
    "temperature": Annotated[float, _option("--temperature", "-T", panel=_KD, help="soft: softening temperature")],
    "alpha": Annotated[float, _option(panel=_KD, help="weight of the ground-truth loss where labels exist "
                                                      "(0: teacher only)")],
    "soft_weight": Annotated[float, _option(panel=_KD, help="soft: weight of the soft-target loss")],
    "pseudo_weight": Annotated[float, _option(panel=_KD, help="pseudo: weight of the pseudo-label loss")],
    "pseudo_hard": Annotated[bool, _option("--pseudo-hard", panel=_KD, help="pseudo: teacher's age as a hard label")],
    "hint_weight": Annotated[float, _option(panel=_KD, help="hint: weight of the feature loss")],
    "hint_layer": Annotated[Optional[str], _option(panel=_KD, help="hint: teacher layer (checkpoint teachers), e.g. "
                                                                   "backbone.layer3 [default: pooled features]")],
    "student_layer": Annotated[Optional[str], _option(panel=_KD, help="hint/ordinal: student layer "
                                                                      "[default: pooled features]")],
    "ordinal_weight": Annotated[float, _option(panel=_KD, help="ordinal: weight of the ranking-teacher loss")],
    "rank_k": Annotated[int, _option(panel=_KD, help="ordinal: faces per shuffled sequence when training the ranker")],
    "rank_epochs": Annotated[Optional[int], _option(panel=_KD, help="ordinal: ranker epochs [default: --epochs]; "
                                                                    "it gets at most half of --time-limit")],
    "teacher_views": Annotated[int, _option(
        "--teacher-views", metavar="K", panel=_KD,
        help="label K fixed augmented crops of each training face with the teacher once, and train on those "
             "crops (soft/pseudo): a slow teacher then costs K passes instead of one per epoch "
             "[0: the teacher runs live]")],
    "recrop": Annotated[bool, _option("--recrop/--no-recrop", panel=_KD,
                                      help="re-crop faces to each teacher's own alignment when both are known")],
    "teacher_device": Annotated[Optional[str], _option(panel=_KD, autocompletion=complete_devices,
                                                       help="device of the teachers [default: --device]")],
    "teacher_half": Annotated[bool, _option("--teacher-half", panel=_KD,
                                            help="run checkpoint teachers in fp16 (CUDA only)")],
    "teacher_mirror": Annotated[bool, _option("--teacher-mirror", panel=_KD,
                                              help="teachers answer each crop as the mean of their answers on it and "
                                                   "on its mirror image: steadier targets at twice the teacher's cost")],
    "mirror_pairs": Annotated[bool, _option("--mirror-pairs", panel=_KD,
                                            help="train on each crop and its mirror image in the same step, their "
                                                 "answers pulled together (--mirror-weight): twice the inputs per "
                                                 "step, so halve --batch-size to keep its cost; with a bank, needs "
                                                 "--teacher-mirror")],
    "mirror_weight": Annotated[float, _option(panel=_KD, help="mirror pairs: weight of the term between the "
                                                              "two sides' age distributions")],
}


def with_options(cls: type, table: dict[str, Any], *, into: str) -> Callable[[Callable], Callable]:
    """Give a command one CLI option per field of `cls` in `table` (default: the field's) and
    call it with `into=cls(**those values)` instead."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(defaults))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {unknown}")

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != into]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name], annotation=annotation)
                 for name, annotation in table.items()]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {name: plain(kwargs.pop(name)) for name in table}
            return command(**kwargs, **{into: cls(**values)})

        wrapper.__signature__ = inspect.Signature(own + added)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return decorate
