"""The recipe's sections: which library function each one calls and where its steps write.

The order of `STAGE_KINDS` is the order stages run in. Stage modules are named by string
and imported only when a recipe uses them, so a recipe that never distils does not load
the distillation code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from agecli.errors import AgecliError

TOP_LEVEL_KEYS = ("description",)


@dataclass(frozen=True)
class StageKind:
    """Where a recipe section's library function lives and how its steps are named."""

    section: str                  # key in the recipe
    module: str                   # importable module
    functions: tuple[str, ...]    # candidate function names, first found wins
    many: bool                    # a list of named entries (train, distill, eval) or one mapping
    stage_dir: str                # manifest folder relative to the run ("{name}" for list stages)
    help: str
    forwards: str | None = None   # a section whose keys this function's **kwargs passes on
    fixed: tuple[str, ...] = ()   # keys of `forwards` that this function sets itself
    inputs: str | None = None     # function (run, **options) -> the inputs the stage would record now

    def function(self) -> Callable[..., Any]:
        """The section's library function; AgecliError when this agecli lacks it."""
        return self._lookup()[1]

    def target(self) -> str:
        """The function's public dotted name (the stage module's, wherever it is defined), as
        the plan shows it: a stage split into a package keeps its name."""
        return f"{self.module}.{self._lookup()[0]}"

    def _lookup(self) -> tuple[str, Callable[..., Any]]:
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            if exc.name != self.module:
                raise
            raise AgecliError(
                f"recipe section {self.section!r} needs {self.module}, which this agecli does not have; "
                f"remove the section or update agecli.") from None
        for name in self.functions:
            func = getattr(module, name, None)
            if callable(func):
                return name, func
        raise AgecliError(f"{self.module} has no {' / '.join(self.functions)} function for recipe section "
                          f"{self.section!r}; this agecli is incomplete.")

    def inputs_function(self) -> Callable[..., Any]:
        """The stage's `inputs` function (only for kinds that have one)."""
        return getattr(importlib.import_module(self.module), self.inputs)


STAGE_KINDS: dict[str, StageKind] = {kind.section: kind for kind in (
    StageKind("prepare", "agecli.stages.prepare", ("prepare",), False, "prepare",
              "detect, align and split faces into the run's face store"),
    StageKind("train", "agecli.stages.train", ("train",), True, "train/{name}",
              "train a model (a teacher, or a student without distillation)"),
    StageKind("cross_validate", "agecli.stages.train", ("cross_validate",), True, "train/{name}-cv",
              "one model per official fold (Adience); per-fold and mean +- std metrics", forwards="train", fixed=("fold",)),
    StageKind("distill", "agecli.stages.distill", ("distill",), True, "distill/{name}",
              "distil one or more teachers into a student"),
    StageKind("eval", "agecli.stages.evaluate", ("evaluate",), True, "eval/{name}",
              "evaluate a checkpoint on a split of the run"),
    StageKind("bench", "agecli.stages.bench", ("bench",), False, "bench",
              "error, latency and robustness of every model in the run", inputs="bench_inputs"),
    StageKind("report", "agecli.stages.report", ("write_report", "report"), False, "",
              "write RUN/report.md"),
)}
