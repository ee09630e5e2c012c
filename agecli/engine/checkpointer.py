"""What a training run leaves in its folder, and how it picks up again after an interruption.

    Checkpointer(out_dir, model, spec, options, extra={"loss_state": loss}, monitor=Monitor())
        best.pt      the best validation score so far: the lowest MAE unless `monitor` names
                     another metric and its direction (`spec.metrics` holds its val metrics)
        last.pt      the newest weights plus the whole training state, for `--resume`
        history.csv  one row per epoch; learning_curve.png plots it

`extra` is the hook for state outside the model and optimiser that a resumed run needs (a
loss with learned parts, such as distillation's hint adapters): each object's `state_dict()`
is saved in last.pt under its key and handed back to its `load_state_dict` on resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch

from agecli.errors import AgecliError
from agecli.modeling.checkpoint import ModelSpec, Seen, load_state, read_checkpoint, save_checkpoint
from agecli.options import TrainOptions
from agecli.rundir import atomic_path, write_csv


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class Monitor:
    """The validation metric that picks best.pt and drives early stopping: its key in the
    validation metrics and whether higher is better (val MAE by default; a ranking model
    monitors its pairwise ranking accuracy)."""

    key: str = "mae"
    higher_is_better: bool = False

    @property
    def worst(self) -> float:
        return -math.inf if self.higher_is_better else math.inf

    def better(self, value: float, best: float) -> bool:
        """`value` beats `best`; anything does while there is no finite best yet."""
        if not math.isfinite(best):
            return True
        return value > best if self.higher_is_better else value < best


class Checkpointer:
    """best.pt / last.pt / history of one run of `fit`, and the record they are made from:
    per-epoch history rows, the best epoch and its monitored value, epochs since it improved,
    and each epoch's wall seconds (the time budget's evidence)."""

    def __init__(self, out_dir: Path, model: torch.nn.Module, spec: ModelSpec, options: TrainOptions,
                 extra: dict[str, Stateful] | None = None, monitor: Monitor | None = None, seen: Seen | None = None):
        self.out_dir, self.model, self.spec, self.options = Path(out_dir), model, spec, options
        self.seen = seen   # written into best.pt and last.pt alike
        self.extra = dict(extra or {})
        self.monitor = monitor or Monitor()
        self.best_path, self.last_path = self.out_dir / "best.pt", self.out_dir / "last.pt"
        self.history: list[dict[str, Any]] = []
        self.walls: list[float] = []
        self.best_value, self.best_epoch, self.stale = self.monitor.worst, 0, 0

    @property
    def best_mae(self) -> float:
        """The best monitored value (the val MAE unless `monitor` says otherwise); the older name."""
        return self.best_value

    # ------------------------------------------------------------------ the record
    def improved(self, epoch: int, metrics: dict[str, Any], has_val: bool) -> bool:
        """Whether `epoch` is the new best (a better monitored value; always, without a validation split)."""
        value = float(metrics.get(self.monitor.key, math.nan)) if metrics else math.nan
        better = bool(metrics) and self.monitor.better(value, self.best_value)
        if not has_val:  # nothing to select on: the newest model is the best we know
            better = True
        if better:
            self.best_value, self.best_epoch, self.stale = (value if metrics else self.monitor.worst), epoch, 0
        else:
            self.stale += 1
        return better

    def should_stop(self) -> bool:
        return self.options.patience is not None and self.stale >= self.options.patience

    # ------------------------------------------------------------------ files
    def save_best(self, epoch: int, metrics: dict[str, Any]) -> None:
        """best.pt: the model's weights now, with `metrics` as its val metrics."""
        self.spec.metrics = {"split": "val", "epoch": epoch, **metrics}
        save_checkpoint(self.best_path, self.model, self.spec, seen=self.seen)

    def save_last(self, epoch: int, metrics: dict[str, Any], loop_state: dict[str, Any]) -> None:
        """last.pt with the training state, history.csv and its plot."""
        state = {"epoch": epoch, **loop_state, "history": self.history, "best_value": self.best_value,
                 "best_epoch": self.best_epoch, "stale": self.stale, "best_metrics": self.spec.metrics,
                 "options": self.options.to_dict(), "walls": self.walls}
        state.update({key: obj.state_dict() for key, obj in self.extra.items()})
        last_spec = replace(self.spec, metrics={"split": "val", "epoch": epoch, **metrics})
        save_checkpoint(self.last_path, self.model, last_spec, training_state=state, seen=self.seen)
        write_csv(self.out_dir / "history.csv", pd.DataFrame(self.history))
        plot_history(self.history, self.out_dir / "learning_curve.png", self.monitor.key)

    def resume(self) -> dict[str, Any]:
        """Load last.pt into the model, the record and the extra objects; returns the training
        state (with "epoch", "optimizer", "scheduler", "scaler", "rng") for the loop's own parts."""
        payload = read_checkpoint(self.last_path)
        if "training_state" not in payload:
            raise AgecliError(f"{self.last_path} holds no training state, so it cannot be resumed; start a new "
                              "run without --resume.")
        load_state(self.model, payload["state_dict"], source=str(self.last_path))
        state = payload["training_state"]
        self.history = list(state["history"])
        # "best_mae": last.pt written before the monitor existed
        self.best_value = float(state.get("best_value", state.get("best_mae", self.monitor.worst)))
        self.best_epoch = int(state["best_epoch"])
        self.stale = int(state["stale"])
        self.spec.metrics = dict(state.get("best_metrics", {}))
        self.walls = list(state.get("walls", []))
        for key, obj in self.extra.items():
            if state.get(key):
                obj.load_state_dict(state[key])
        return state

    def last_good(self, epoch: int) -> str:
        """Where the last good weights are, for an error raised during `epoch`."""
        if self.last_path.exists():
            return f"the last good checkpoint is {self.last_path} (epoch {epoch - 1})"
        return "no checkpoint was written yet"


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """torch's global, the augmentation generator's and (where present) CUDA's random states."""
    state = {"torch": torch.get_rng_state(), "augment": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plot_history(history: list[dict[str, Any]], path: Path, key: str = "mae") -> None:
    """Learning curve: training loss and the validation metric `key` per epoch (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(history)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(frame["epoch"], frame["train_loss"], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    if f"val_{key}" in frame:
        label = "val MAE (years)" if key == "mae" else f"val {key}"
        ax2 = ax.twinx()
        ax2.plot(frame["epoch"], frame[f"val_{key}"], "s-", color="tab:red", label=label)
        ax2.set_ylabel(label, color="tab:red")
    ax.set_title("learning curve")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
