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

from agecli.errors import AgecliError


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
    device: str = "cpu"                  # cpu | cuda | cuda:N | auto (cuda when there is a GPU, else cpu)
    amp: bool = True                     # mixed precision (bf16, or fp16 + grad scaling); CUDA only
    channels_last: bool = True           # NHWC memory format; CUDA only
    compile: bool = False                # torch.compile the model (slow start, faster steps)
    augment: bool = True                 # flip, zoom/shift/rotate, colour jitter (agecli.data.Augment)
    seed: int = 0                        # seeds init, shuffling and augmentation: same seed, same model
    workers: int = 3                     # batches prefetched by the background loader (0 = inline)
    threads: int | None = None           # torch CPU threads (None = torch's default)
    val_batch_size: int = 256            # faces per step when validating
    resume: bool = False                 # continue from out_dir/last.pt exactly where it stopped
    max_batches: int | None = None       # cap on steps per epoch (smoke tests, benchmarks)
    precise_bn_batches: int = 20         # re-estimate BatchNorm statistics on this many un-augmented batches before validating

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or not self.lr > 0:
            raise AgecliError(f"need epochs >= 1, batch size >= 2 and lr > 0 (got {self.epochs}, "
                              f"{self.batch_size}, {self.lr}).")
        if self.time_limit is not None and not self.time_limit > 0:
            raise AgecliError(f"--time-limit is in minutes and must be positive (got {self.time_limit}).")
        if self.optimizer not in ("adamw", "sgd"):
            raise AgecliError(f"unknown optimizer {self.optimizer!r}; choose adamw or sgd.")
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
    device: str = "cpu"              # where MTCNN runs: cpu | cuda
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
        if not 16 <= self.size <= 1024:
            raise AgecliError(f"--size {self.size} is out of range; use 16..1024 pixels (e.g. 128).")
        if not 0 <= self.margin <= 3:
            raise AgecliError(f"--margin {self.margin} is out of range; use 0..3 (0.4 = 40% extra context).")
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

    def __post_init__(self) -> None:
        asked = (self.method,) if isinstance(self.method, str) else tuple(self.method)
        self.method = tuple(dict.fromkeys(asked))
        bad = [m for m in self.method if m not in METHODS]
        if bad or not self.method:
            raise AgecliError(f"unknown method(s) {bad or '(none)'}; choose from {', '.join(METHODS)} "
                              "(combinable: --method soft --method hint).")
        if self.teacher_views < 0:
            raise AgecliError(f"--teacher-views must be 0 (the teacher runs live) or more (got {self.teacher_views}).")
        if self.rank_k < 2:
            raise AgecliError(f"--rank-k must be at least 2 (got {self.rank_k}).")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
