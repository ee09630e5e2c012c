"""Each stage's options: plain dataclasses without torch, so the CLI can show their defaults
(`agecli --help`) without importing torch. Each is the single source of its stage's defaults
and of their validation, for Python callers, recipes and the command line alike.

    PrepareOptions  prepare: crop size and alignment, detector, splits, shards
    TrainOptions    the training loop (`agecli.engine.loop.fit`), used by train and distill
    DistillOptions  how distill teaches its student: methods, loss weights, teacher handling
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from agecli.device import check_device_name
from agecli.errors import AgecliError

MIN_SIZE, MAX_SIZE = 16, 1024    # face crop and model input sides, pixels (below 16 the backbones see nothing)
MAX_MARGIN = 3.0                 # alignment context, fraction of the template crop
DEVICES = ("auto", "cpu", "cuda")  # device names, besides cuda:N (auto: cuda when torch sees a GPU, else cpu)
ENCODING_NAMES = ("regression", "classification", "ldae", "ordinal", "groups")  # agecli.modeling.encodings
OPTIMIZERS = ("adamw", "sgd")


def check_range(options: Any, bounds: dict[str, tuple[float, float, str]]) -> None:
    """Each named field within [low, high] (None passes where the field allows it); the message
    names the option as the command line spells it and says what it takes."""
    for field, (low, high, meaning) in bounds.items():
        value = getattr(options, field)
        if value is None:
            continue
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or not (value > low if isinstance(low, Above) else value >= low) or not value <= high:
            first = f"above {_number(low)}" if isinstance(low, Above) else f"at least {_number(low)}"
            span = first if high == INF else f"{first}, at most {_number(high)}"
            raise AgecliError(f"--{field.replace('_', '-')} {value!r} is out of range: {meaning} ({span}).")


class Above(float):
    """A lower bound that a value must exceed (not merely reach)."""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


INF = float("inf")


@dataclass
class TrainOptions:
    """Every knob of the training loop, with its default. Recipes set them by name."""

    epochs: int = 30                     # passes over the training split (an upper bound under time_limit)
    time_limit: float | None = None      # minutes: shorten the schedule so training ends within it
    batch_size: int = 128                # faces per step (per process under torchrun)
    lr: float = 3e-3                     # peak learning rate, reached after warm-up
    weight_decay: float = 5e-4           # decoupled (AdamW) or L2 (SGD); not applied to norms/biases
    optimizer: str = "adamw"             # adamw | sgd (momentum 0.9, Nesterov)
    warmup_epochs: float = 1.0           # linear warm-up from lr/100, then cosine to lr/100
    clip_grad: float | None = 5.0        # max gradient norm; None (or 0) = no clipping
    patience: int | None = None          # stop after this many epochs without a better val MAE
    device: str = "auto"                 # auto (cuda when there is a GPU, else cpu) | cpu | cuda | cuda:N
    amp: bool = True                     # mixed precision (bf16, or fp16 + grad scaling); CUDA only
    channels_last: bool = True           # NHWC memory format; CUDA only
    compile: bool = False                # torch.compile the model (slow start, faster steps)
    augment: bool = True                 # flip, zoom/shift/rotate, colour jitter (agecli.data.Augment)
    robust_augment: float = 0.0          # share of training faces also degraded (noise, blur, JPEG; AugMix-style mix)
    labelled_fraction: float = 1.0       # keep the labels of this share of training faces (the same faces in every stage)
    seed: int = 0                        # seeds init, shuffling and augmentation: same seed, same model
    workers: int = 3                     # batches prefetched by the background loader (0 = inline)
    threads: int | None = None           # torch CPU threads (None = torch's default)
    val_batch_size: int = 256            # faces per step when validating
    resume: bool = False                 # continue from out_dir/last.pt exactly where it stopped
    max_batches: int | None = None       # cap on steps per epoch (smoke tests, benchmarks)
    precise_bn_batches: int = 20         # re-estimate BatchNorm statistics on this many un-augmented batches before validating
    ema: float = 0.0                     # decay per step of a weight average validated and kept as best.pt (0 = off)
    layer_decay: float = 1.0             # each backbone layer's lr this times the one above it (1 = one lr for all)

    def __post_init__(self) -> None:
        check_range(self, {
            "epochs": (1, INF, "passes over the training split"),
            "batch_size": (2, INF, "faces per step; BatchNorm needs two"),
            "lr": (Above(0), 10, "the peak learning rate"),
            "time_limit": (Above(0), INF, "minutes; leave it out for no limit"),
            "weight_decay": (0, 1, "weight decay"),
            "warmup_epochs": (0, INF, "epochs of warm-up"),
            "clip_grad": (0, INF, "the max gradient norm; 0 turns clipping off"),
            "patience": (1, INF, "epochs without a better val MAE; leave it out to never stop early"),
            "seed": (0, 2 ** 32 - 1, "a seed"),
            "workers": (0, 64, "batches prefetched; 0 loads them inline"),
            "threads": (1, 1024, "torch CPU threads; leave it out for torch's choice"),
            "val_batch_size": (1, INF, "faces per step when validating"),
            "max_batches": (1, INF, "steps per epoch; leave it out for all"),
            "precise_bn_batches": (0, INF, "batches; 0 keeps the running statistics"),
            "ema": (0, 0.99999, "the weight average's decay per step, e.g. 0.998; 0 = off"),
            "layer_decay": (Above(0), 1, "each layer's share of the learning rate of the layer above, e.g. 0.7; 1 = off"),
            "robust_augment": (0, 1, "the share of training faces degraded by noise, blur or JPEG; 0 = off"),
            "labelled_fraction": (Above(0), 1, "the share of training faces whose labels are kept; 1 = all"),
        })
        if self.optimizer not in OPTIMIZERS:
            raise AgecliError(f"unknown optimizer {self.optimizer!r}; choose {' or '.join(OPTIMIZERS)}.")
        check_device_name(self.device)
        if not self.clip_grad:  # the command line's 0 means off, as None does
            self.clip_grad = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DETECTORS = ("mtcnn", "none")   # face detectors of prepare (none: the images are already aligned crops)


@dataclass
class PrepareOptions:
    """Every option of the prepare stage (`agecli.stages.prepare.prepare`, whose keywords
    these are), with its default. Checked on creation: AgecliError names the first bad one."""

    size: int = 128                  # output side of the aligned crops, pixels
    margin: float = 0.4              # context around the template, fraction of the template crop
    template: str = "arcface5"       # 5-point template, see agecli.data.faces.TEMPLATES
    detector: str | None = None      # mtcnn | none; None = the dataset's default
    device: str = "auto"             # where MTCNN runs: auto | cpu | cuda | cuda:N
    workers: int | None = None       # detection processes; None = up to 8 with mtcnn on the CPU, else in-process
    limit: int | None = None         # only this many images, a seeded random sample (quick trials)
    shard: str | None = None         # "I/N" (1-based): only chunks I-1, I-1+N, ... so jobs can share a run
    strict: bool = False             # fail when images the dataset lists are missing
    seed: int = 0                    # seeds the split assignment and the `limit` sample
    val_fraction: float = 0.1        # seeded validation share (by subject, else by content)
    test_fraction: float = 0.2       # seeded test share where the dataset has no official split
    max_side: int = 640              # images are scaled to this longer side for detection
    min_score: float = 0.9           # detections below this MTCNN probability are ignored

    def __post_init__(self) -> None:
        if self.detector is not None and self.detector not in DETECTORS:
            raise AgecliError(f"unknown detector {self.detector!r}; choose mtcnn or none.")
        check_range(self, {
            "size": (MIN_SIZE, MAX_SIZE, "the side of the face crops in pixels, e.g. 128"),
            "margin": (0, MAX_MARGIN, "context around the template; 0.4 = 40% more"),
            "workers": (0, 256, "detection processes; 0 detects in this process"),
            "limit": (1, INF, "images to sample; leave it out for all"),
            "seed": (0, 2 ** 32 - 1, "a seed"),
            "max_side": (32, 16384, "pixels of the longer side that detection sees"),
            "min_score": (0, 1, "the detector's probability"),
        })
        check_device_name(self.device)
        if not isinstance(self.template, str):
            raise AgecliError(f"--template {self.template!r} must be a template name such as arcface5.")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise AgecliError("--val-fraction and --test-fraction must be in [0, 1) and sum to less than 1.")
        self.shard_slot()

    def shard_slot(self) -> tuple[int, int]:
        """`shard` "I/N" as (I - 1, N); (0, 0) without a shard."""
        if self.shard is None:
            return 0, 0
        try:
            i, n = (int(v) for v in self.shard.split("/"))
        except ValueError:
            raise AgecliError(f"--shard {self.shard!r} must look like I/N, e.g. 1/4 (the first of four jobs).") from None
        if not 1 <= i <= n:
            raise AgecliError(f"--shard {self.shard}: I must be between 1 and N.")
        return i - 1, n

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


METHODS = ("soft", "pseudo", "hint", "ordinal")   # distillation methods (see agecli.stages.distill)


@dataclass
class DistillOptions:
    """How `agecli distill` teaches its student, with the documented defaults. Recipes and
    `distill(...)` keywords set them by name; the training loop's own knobs are TrainOptions."""

    method: str | tuple[str, ...] = ("soft",)   # soft | pseudo | hint | ordinal, or several combined
    temperature: float = 4.0          # soft: softening temperature T
    alpha: float = 0.5                # weight of the ground-truth loss where labels exist (0 = teacher only)
    soft_weight: float = 1.0          # soft: weight of the soft-target loss
    pseudo_weight: float = 1.0        # pseudo: weight of the pseudo-label loss
    pseudo_hard: bool = False         # pseudo: teacher's expected age as a hard label instead of its distribution
    hint_weight: float = 1.0          # hint: weight of the feature loss
    hint_layer: str | None = None     # hint: teacher layer (agecli checkpoints); default pooled features
    student_layer: str | None = None  # hint/ordinal: student layer; default pooled features
    ordinal_weight: float = 1.0       # ordinal: weight of the ranking-teacher loss
    rank_k: int = 4                   # ordinal: faces per shuffled sequence when training the ranker
    rank_epochs: int | None = None    # ordinal: epochs of the ranking teacher (default: the student's)
    teacher_views: int = 0            # label K fixed augmented crops per face once (0: the teacher runs live)
    recrop: bool = True               # re-crop faces to each teacher's own alignment when both are known
    teacher_device: str | None = None  # device of the teachers (default: the student's)
    teacher_half: bool = False        # run checkpoint teachers in fp16 (CUDA only)
    teacher_mirror: bool = False      # teachers answer each crop as the mean over it and its mirror image
    mirror_pairs: bool = False        # every step trains on each crop and its mirror image (2x the inputs)
    # mirror_pairs: weight of the term pulling the two sides' answers together. Their JS divergence is
    # about a quarter of a KL for near distributions: 4 weighs a year between the sides as the soft
    # term weighs a year between student and teacher
    mirror_weight: float = 4.0

    def __post_init__(self) -> None:
        asked = (self.method,) if isinstance(self.method, str) else tuple(self.method)
        self.method = tuple(dict.fromkeys(asked))
        bad = [m for m in self.method if m not in METHODS]
        if bad or not self.method:
            raise AgecliError(f"unknown method(s) {bad or '(none)'}; choose from {', '.join(METHODS)} "
                              "(combinable: --method soft --method hint).")
        check_range(self, {
            "temperature": (Above(0), 1000, "the softening temperature"),
            "alpha": (0, 1, "the weight of the ground-truth loss"),
            "soft_weight": (0, INF, "a loss weight"),
            "pseudo_weight": (0, INF, "a loss weight"),
            "hint_weight": (0, INF, "a loss weight"),
            "ordinal_weight": (0, INF, "a loss weight"),
            "mirror_weight": (0, INF, "a loss weight"),
            "rank_k": (2, 64, "faces per ranking sequence"),
            "rank_epochs": (1, INF, "epochs of the ranking teacher; leave it out for the student's"),
            "teacher_views": (0, 1000, "fixed views per face; 0 runs the teacher live"),
        })
        if self.teacher_device is not None:
            check_device_name(self.teacher_device, "--teacher-device")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
