"""`--jobs N`: the steps of one section run N at a time, each as a child process
`python -m agecli run RUN/logs/recipe-<hash>.yaml --step LABEL` (the parent's recipe, frozen)
logging to RUN/logs/<label>.log.

A step starts only once the steps of its section whose output it reads have finished
(`needs`). After a failure no new step starts; the running ones finish and are recorded,
then AgecliError names the failed steps with the tail of their logs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agecli.errors import AgecliError
from agecli.progress import log
from agecli.recipes.plan import needs
from agecli.recipes.recipe import Step

LOGS_DIR = "logs"                 # RUN/logs/<label>.log: the output of steps run as child processes


@dataclass
class _Child:
    step: Step
    row: dict[str, Any]
    log_path: Path
    process: subprocess.Popen
    log_file: typing.IO[str]
    started: float


def child_command(step: Step, run: Path, recipe_file: Path, root) -> list[str]:
    """`agecli run` for one step, on the parent's frozen copy of the recipe (overrides applied)."""
    command = [sys.executable, "-m", "agecli", "run", str(recipe_file), "--run", str(run),
               "--step", step.label, "--quiet", "--no-state"]
    return command + (["--root", str(root)] if root is not None else [])


def _child_env(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    # N children each using every core would oversubscribe the CPU (data loading, CPU-side ops)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    # rich wraps output to a file at 80 columns; a log reads (and greps) better unwrapped
    env.setdefault("COLUMNS", "200")
    # the children import the same agecli as this process, installed or not
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


def run_in_children(runnable: list[tuple[Step, dict[str, Any]]], run: Path, recipe_file: Path, root, jobs: int,
                    record: Callable[[Step, float], None], quiet: bool) -> None:
    """Run one section's steps up to `jobs` at a time as child processes. After a failure no
    new step starts, the running ones finish (and are recorded), then AgecliError says why."""
    logs = run / LOGS_DIR
    logs.mkdir(parents=True, exist_ok=True)
    env = _child_env(jobs)
    waiting = list(runnable)
    running: list[_Child] = []
    failed: list[_Child] = []
    try:
        while waiting or running:
            while waiting and len(running) < jobs and not failed:
                ready = _next_ready(waiting, running, run)
                if ready is None:
                    break
                waiting.remove(ready)
                running.append(_start(*ready, run, recipe_file, root, env, quiet))
            time.sleep(0.2)
            for child in [c for c in running if c.process.poll() is not None]:
                running.remove(child)
                if not _finish(child, record, quiet):
                    failed.append(child)
    finally:
        for child in running:  # interrupted: do not leave children training unattended
            child.process.terminate()
            child.process.wait()
            child.log_file.close()
    if failed:
        raise AgecliError(_failure_message(failed, [step.label for step, _ in waiting]))


def _next_ready(waiting: list[tuple[Step, dict[str, Any]]], running: list[_Child], run: Path):
    """The first waiting step none of whose inputs is still waiting or running in this section."""
    unfinished = [s for s, _ in waiting] + [c.step for c in running]
    ready = [pair for pair in waiting if not needs(pair[0], unfinished, run)]
    return ready[0] if ready else None


def _start(step: Step, row: dict[str, Any], run: Path, recipe_file: Path, root, env: dict[str, str],
           quiet: bool) -> _Child:
    log_path = run / LOGS_DIR / (step.label.replace("/", "__") + ".log")
    log_file = open(log_path, "w", encoding="utf-8")
    process = subprocess.Popen(child_command(step, run, recipe_file, root), stdout=log_file,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    log(f"[bold]{step.label}[/]: {row['call']} (process {process.pid}, log {log_path})", quiet)
    return _Child(step, row, log_path, process, log_file, time.perf_counter())


def _finish(child: _Child, record: Callable[[Step, float], None], quiet: bool) -> bool:
    """Close a child that has exited and record it; False when it failed."""
    child.log_file.close()
    seconds = round(time.perf_counter() - child.started, 2)
    if child.process.returncode != 0:
        log(f"[red]{child.step.label}: failed (exit code {child.process.returncode}), "
            f"see {child.log_path}[/]", quiet)
        return False
    child.row["seconds"] = seconds
    child.row["results"] = {"log": str(child.log_path)}
    record(child.step, seconds)
    log(f"[dim]{child.step.label}: done in {seconds} s[/]", quiet)
    return True


def _failure_message(failed: list[_Child], not_started: list[str]) -> str:
    parts = [f"step(s) {', '.join(c.step.label for c in failed)} failed; no later section was started."]
    for child in failed:
        parts.append(f"\n{child.step.label} exited with code {child.process.returncode}; log: {child.log_path}")
        tail = _last_lines(child.log_path, 15)
        parts.extend(f"  | {line}" for line in tail)
    if not_started:
        parts.append(f"\nnot started: {', '.join(not_started)}.")
    parts.append("\nSteps that finished are recorded; fix the failure and re-run the same command to continue.")
    return "\n".join(parts)


def _last_lines(path: Path, count: int) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if line.strip()][-count:]
