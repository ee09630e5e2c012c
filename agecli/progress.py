"""Progress reporting that library code can use without knowing about the terminal.

Library functions take `progress: ProgressFn | None` and call `progress(task, done, total)`.
The CLI passes a rich progress bar (`rich_progress`), tests pass nothing or a recorder.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Protocol


class ProgressFn(Protocol):
    def __call__(self, task: str, done: int, total: int | None) -> None: ...


def noop(task: str, done: int, total: int | None) -> None:
    return None


@contextlib.contextmanager
def rich_progress(quiet: bool = False) -> Iterator[ProgressFn]:
    """A ProgressFn drawing one rich bar per task name, on stderr (stdout stays for --json)."""
    if quiet:
        yield noop
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    bars: dict[str, int] = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                  transient=False) as bar:
        def update(task: str, done: int, total: int | None) -> None:
            if task not in bars:
                bars[task] = bar.add_task(task, total=total)
            bar.update(bars[task], completed=done, total=total)

        yield update


def log(message: str, quiet: bool = False) -> None:
    """A line of human-readable status on stderr."""
    if not quiet:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(message)   # no line breaks inside paths


Callback = Callable[[str, int, "int | None"], None]
