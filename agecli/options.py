"""The training loop's options: a plain dataclass without torch, so the CLI can show its
defaults (`agecli --help`) without importing torch. `agecli.train.TrainOptions` is the same class."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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
    clip_grad: float | None = 5.0        # max gradient norm; None = no clipping
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
