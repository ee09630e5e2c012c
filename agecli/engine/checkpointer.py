"""What a training run leaves in its folder, and how it picks up again after an interruption.

    Checkpointer(out_dir, model, spec, options, extra={"loss_state": loss})
        best.pt      the lowest validation MAE so far (`spec.metrics` holds its val metrics)
        last.pt      the newest weights plus the whole training state, for `--resume`
        history.csv  one row per epoch; learning_curve.png plots it

`extra` is the hook for state outside the model and optimiser that a resumed run needs (a
loss with learned parts, such as distillation's hint adapters): each object's `state_dict()`
is saved in last.pt under its key and handed back to its `load_state_dict` on resume.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch

from agecli.errors import AgecliError
from agecli.modeling.checkpoint import ModelSpec, load_state, read_checkpoint, save_checkpoint
from agecli.options import TrainOptions
from agecli.rundir import atomic_path, write_csv


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class Checkpointer:
    """best.pt / last.pt / history of one run of `fit`, and the record they are made from:
    per-epoch history rows, the best epoch and its MAE, epochs since it improved, and each
    epoch's wall seconds (the time budget's evidence)."""

    def __init__(self, out_dir: Path, model: torch.nn.Module, spec: ModelSpec, options: TrainOptions,
                 extra: dict[str, Stateful] | None = None):
        self.out_dir, self.model, self.spec, self.options = Path(out_dir), model, spec, options
        self.extra = dict(extra or {})
        self.best_path, self.last_path = self.out_dir / "best.pt", self.out_dir / "last.pt"
        self.history: list[dict[str, Any]] = []
        self.walls: list[float] = []
        self.best_mae, self.best_epoch, self.stale = math.inf, 0, 0

    # ------------------------------------------------------------------ the record
    def improved(self, epoch: int, metrics: dict[str, Any], has_val: bool) -> bool:
        """Whether `epoch` is the new best (lower val MAE; always, without a validation split)."""
        val_mae = metrics.get("mae", math.nan) if metrics else math.nan
        better = bool(metrics) and (val_mae < self.best_mae or not math.isfinite(self.best_mae))
        if not has_val:  # nothing to select on: the newest model is the best we know
            better = True
        if better:
            self.best_mae, self.best_epoch, self.stale = (val_mae if metrics else math.inf), epoch, 0
        else:
            self.stale += 1
        return better

    def should_stop(self) -> bool:
        return self.options.patience is not None and self.stale >= self.options.patience

    # ------------------------------------------------------------------ files
    def save(self, epoch: int, metrics: dict[str, Any], improved: bool, loop_state: dict[str, Any]) -> None:
        """Write best.pt (when improved), last.pt with the training state, history.csv and its plot.
        `loop_state`: the optimiser, scheduler, scaler and random-number states."""
        if improved:
            self.spec.metrics = {"split": "val", "epoch": epoch, **metrics}
            save_checkpoint(self.best_path, self.model, self.spec)
        state = {"epoch": epoch, **loop_state, "history": self.history, "best_mae": self.best_mae,
                 "best_epoch": self.best_epoch, "stale": self.stale, "best_metrics": self.spec.metrics,
                 "options": self.options.to_dict(), "walls": self.walls}
        state.update({key: obj.state_dict() for key, obj in self.extra.items()})
        last_spec = replace(self.spec, metrics={"split": "val", "epoch": epoch, **metrics})
        save_checkpoint(self.last_path, self.model, last_spec, training_state=state)
        write_csv(self.out_dir / "history.csv", pd.DataFrame(self.history))
        plot_history(self.history, self.out_dir / "learning_curve.png")

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
        self.best_mae, self.best_epoch = float(state["best_mae"]), int(state["best_epoch"])
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


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Learning curve: training loss and validation MAE per epoch (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(history)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(frame["epoch"], frame["train_loss"], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    if "val_mae" in frame:
        ax2 = ax.twinx()
        ax2.plot(frame["epoch"], frame["val_mae"], "s-", color="tab:red", label="val MAE")
        ax2.set_ylabel("val MAE (years)", color="tab:red")
    ax.set_title("learning curve")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
