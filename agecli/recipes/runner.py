"""Running a planned recipe: what each step would do now (run, resume, skip, refuse), the
steps run in order into one run directory, and what the run records about them.

Each step is skipped when its stage manifest says "complete" (and its options have not
changed since, per RUN/recipe-state.json), so re-running a recipe resumes it. A finished
step runs again when what it read has changed since (its manifest's "reads": a retrained
teacher, re-prepared faces) or when a step it reads from runs before it; its old folder
moves to RUN/superseded/. The recipe as given (plus `--set` overrides) is copied into the
run as RUN/recipe.yaml. Steps of one section may run as child processes (`jobs`,
agecli.recipes.children).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from agecli.device import gpu_index, gpus_here
from agecli.errors import AgecliError
from agecli.progress import ProgressFn, log
from agecli.recipes.children import LOGS_DIR, run_in_children
from agecli.recipes.kinds import STAGE_KINDS
from agecli.recipes.plan import call_arguments, needs, plan
from agecli.recipes.recipe import RECIPE_FILE, Recipe, Step, did_you_mean
from agecli.recipes.signatures import RUNNER_FILLED, parameters
from agecli.rundir import (LOCK_NAME, StageLock, changed_reads, fingerprint_file, json_default, read_json,
                           shown_in_run, unique_name, write_json, write_text)

STATE_FILE = "recipe-state.json"
NOT_SELECTED = "not selected"


def run_recipe(recipe: Recipe, run: str | Path, root: str | Path | None = None, *, dry_run: bool = False,
               progress: ProgressFn | None = None, quiet: bool = True, jobs: int = 1,
               only: Sequence[str] | None = None, record_state: bool = True) -> dict[str, Any]:
    """Validate the whole recipe, then run its steps in order, skipping completed ones.

    `only`: step labels (`train/teacher`) or section names to run; the rest are left out.
    `jobs`: run up to this many steps of one section at once, as child processes (1 = all
    in this process). `record_state=False` leaves RUN/recipe-state.json alone (a child's
    parent records it).

    Returns {"run", "recipe", "dry_run", "steps": [{step, action, seconds, results}]};
    a step run as a child has results {"log": its log file}.
    """
    run = Path(run)
    if jobs < 1:
        raise AgecliError(f"--jobs {jobs}: give 1 or more steps to run at once.")
    if root is not None and not Path(root).exists():
        raise AgecliError(f"--root {root} does not exist; point it at the dataset folder.")
    steps = plan(recipe, run, root)
    rows = describe_plan(steps, run, root, select_steps(steps, only))
    changed = [r["step"] for r in rows if r["action"] == _ACTIONS["changed"]]
    if changed:
        raise AgecliError(
            f"run {run}: step(s) {', '.join(changed)} already completed with different options than this "
            f"recipe gives them. Use a new --run DIR, or delete those stage folders to redo them.")
    refused = [f"{r['step']} ({r['action'][len('refuse ('):-1]})" for r in rows if r["action"].startswith("refuse (")]
    if refused:
        raise AgecliError(f"run {run}: {'; '.join(refused)}.")
    out: dict[str, Any] = {"run": str(run), "recipe": str(recipe.path) if recipe.path else None,
                           "root": str(root) if root is not None else None, "dry_run": dry_run, "steps": rows}
    if dry_run:
        return out
    _require_devices(steps, rows)
    run.mkdir(parents=True, exist_ok=True)
    if record_state:  # a child leaves the run's copy to its parent
        _copy_recipe(recipe, run)

    def record(step: Step, seconds: float) -> None:
        if record_state:
            # read afresh: another `agecli run --step` on this run may have recorded its step meanwhile
            latest = read_state(run)
            latest.setdefault("steps", {})[step.label] = {"fingerprint": step.fingerprint(), "seconds": seconds,
                                                          "manifest": _manifest_hash(step, run)}
            write_json(run / STATE_FILE, latest)

    for section_steps in _by_section(list(zip(steps, rows))):
        runnable = _runnable(section_steps, quiet)
        if jobs > 1 and len(runnable) > 1:
            run_in_children(runnable, run, frozen_recipe(recipe, run), root, jobs, record, quiet)
        else:
            for step, row in runnable:
                _run_here(step, row, run, root, progress, quiet)
                record(step, row["seconds"])
    return out


def _runnable(section_steps: list[tuple[Step, dict[str, Any]]], quiet: bool) -> list[tuple[Step, dict[str, Any]]]:
    """The steps of a section that run now (complete ones are logged as skipped)."""
    runnable = []
    for step, row in section_steps:
        if row["action"].startswith("skip"):
            log(f"[dim]{step.label}: complete, skipped[/]", quiet)
        elif row["action"] != NOT_SELECTED:
            runnable.append((step, row))
    return runnable


def _run_here(step: Step, row: dict[str, Any], run: Path, root, progress: ProgressFn | None, quiet: bool) -> None:
    """Run one step in this process; its seconds and results go into `row`."""
    log(f"[bold]{step.label}[/]: {row['call']}", quiet)
    if row["action"] == "resume":
        _prepare_resume(step, run, quiet)
    elif row["action"].startswith("rerun"):
        _set_aside(step, run, quiet)
    elif row["action"] == "run":
        _reclaim_empty(step, run)
    func, kwargs = call_arguments(step, run, root, progress)
    started = time.perf_counter()
    result = func(**kwargs)
    row["seconds"] = round(time.perf_counter() - started, 2)
    row["results"] = _summarise(result)


def _by_section(pairs: list[tuple[Step, dict[str, Any]]]) -> list[list[tuple[Step, dict[str, Any]]]]:
    """Consecutive steps of the same section, in order (steps are planned section by section)."""
    groups: list[list[tuple[Step, dict[str, Any]]]] = []
    for pair in pairs:
        if groups and groups[-1][0][0].section == pair[0].section:
            groups[-1].append(pair)
        else:
            groups.append([pair])
    return groups


# --------------------------------------------------------------------------- what a run would do
def step_status(step: Step, run: Path, state: dict[str, Any]) -> tuple[str, str]:
    """(complete | changed | rewritten | stale | partial | new, why) — what a run would do with this step.

    stale: finished, but what it read has changed since (a student whose teacher was
    retrained, an eval of a model resumed after it, a bench that predates a newer model),
    so it runs again."""
    stage_dir = step.stage_dir(run)
    if stage_dir is None:
        return "new", ""
    manifest = stage_dir / "manifest.json"
    if not manifest.exists():
        return "new", ""
    try:
        recorded_manifest = read_json(manifest)
    except AgecliError:
        return "partial", ""
    if recorded_manifest.get("status") != "complete":
        return "partial", ""
    recorded = state.get("steps", {}).get(step.label, {})
    if recorded.get("fingerprint") not in (None, step.fingerprint()):
        return "changed", ""
    if STAGE_KINDS[step.section].many and recorded.get("manifest") not in (None, _manifest_hash(step, run)):
        return "rewritten", (f"its folder was rewritten since this recipe ran it, by `{recorded_manifest.get('command')}`: "
                             "delete the folder to redo the step, or use a new --run")
    changed = changed_reads(recorded_manifest, run)
    if changed:
        gone = [shown_in_run(path, run) for path in changed if not Path(path).exists()]
        edited = [shown_in_run(path, run) for path in changed if Path(path).exists()]
        return "stale", "; ".join(f"{', '.join(paths)} {verb}" for verb, paths in
                                  (("changed since", edited), ("gone", gone)) if paths)
    kind = STAGE_KINDS[step.section]
    if kind.inputs is not None:
        options = {k: v for k, v in step.kwargs.items() if k not in RUNNER_FILLED}
        if kind.inputs_function()(run, **options) != recorded_manifest.get("inputs"):
            return "stale", "models changed since"
    return "complete", ""


_ACTIONS = {"complete": "skip (complete)", "partial": "resume", "new": "run",
            "changed": "refuse (options changed)", "stale": "rerun", "missing": "refuse", "rewritten": "refuse"}
WILL_RUN = ("new", "partial", "stale")


def describe_plan(steps: list[Step], run: Path, root, selected: set[str] | None = None) -> list[dict[str, Any]]:
    """One row per step saying what a run would do with it (`selected`: the labels to run, None = all).

    A finished step is run again when a step it reads from runs before it in this run
    (`upstream`): it would otherwise keep results of a model that is about to be replaced."""
    state = read_state(run)
    rows, running = [], []
    for step in steps:
        if selected is not None and step.label not in selected:
            rows.append(_row(step, NOT_SELECTED))
            continue
        status, why = step_status(step, run, state)
        missing = [shown_in_run(path, run) for path in (_gone(step, run) if status == "stale" else [])
                   if not any(_inside(path, other.stage_dir(run)) for other in upstream(step, steps, run)
                              if other.label in running)]
        if missing:
            status, why = "missing", (f"{', '.join(missing)} gone, and no step run before it writes it: run that "
                                      "step too (--step), put it back, or delete this step's folder to redo it")
        if status == "complete":
            before = [other.label for other in upstream(step, steps, run) if other.label in running]
            if before:
                status, why = "stale", f"{', '.join(before)} runs first"
        if status in WILL_RUN:
            running.append(step.label)
        action = _ACTIONS[status] + (f" ({why})" if why else "")
        rows.append(_row(step, action))
    return rows


def _manifest_file(step: Step, run: Path) -> Path | None:
    """The step's manifest.json where it exists."""
    folder = step.stage_dir(run)
    return folder / "manifest.json" if folder is not None and (folder / "manifest.json").is_file() else None


def _manifest_hash(step: Step, run: Path) -> str | None:
    """The hash of the step's manifest as this recipe left it: another command that writes the
    folder since (an eval of another model under the step's name, a resume) changes it."""
    manifest = _manifest_file(step, run)
    return fingerprint_file(manifest) if manifest is not None else None


def _gone(step: Step, run: Path) -> list[Path]:
    """What a finished step read that no longer exists."""
    manifest = _manifest_file(step, run)
    if manifest is None:
        return []
    try:
        return [path for path in changed_reads(read_json(manifest), run) if not path.exists()]
    except AgecliError:
        return []


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and folder.resolve() in path.resolve().parents


def _row(step: Step, action: str) -> dict[str, Any]:
    return {"step": step.label, "call": STAGE_KINDS[step.section].target(), "action": action,
            "options": step.kwargs}


def upstream(step: Step, steps: Sequence[Step], run: Path) -> list[Step]:
    """The steps before `step` whose output it reads: prepare (every stage reads the run's
    faces) and the steps whose folders its options name."""
    before = steps[:steps.index(step)]
    if STAGE_KINDS[step.section].inputs is not None:
        return list(before)   # bench: every model of the run
    found = [other for other in before if other.section == "prepare"]
    return found + [other for other in needs(step, before, run) if other not in found]


def select_steps(steps: list[Step], only: Sequence[str] | None) -> set[str] | None:
    """The labels `only` names (a step label, or a section meaning all of its steps); None = all."""
    if only is None:
        return None
    labels = [step.label for step in steps]
    sections = list(dict.fromkeys(step.section for step in steps))
    unknown = [name for name in only if name not in labels and name not in sections]
    if unknown:
        raise AgecliError(
            f"--step {', '.join(unknown)}: no such step in this recipe"
            f"{did_you_mean(unknown[0], labels + sections)}. Steps: {', '.join(labels)} "
            f"(or a whole section: {', '.join(sections)}).")
    return {step.label for step in steps if step.label in only or step.section in only}


# --------------------------------------------------------------------------- before and after steps
def _require_devices(steps: list[Step], rows: list[dict[str, Any]]) -> None:
    """Refuse up front a recipe that wants a GPU on a machine without one, rather than after
    its first steps have run for an hour."""
    wanted: dict[str, list[str]] = {}
    devices: dict[str, str] = {}   # step label -> the CUDA device it asks for (the highest index)
    for step, row in zip(steps, rows):
        if row["action"] in ("run", "resume") or row["action"].startswith("rerun"):
            for key in ("device", "teacher_device"):
                value = step.kwargs.get(key)
                labels = wanted.setdefault(step.section, [])
                if isinstance(value, str) and value.startswith("cuda"):
                    if step.label not in labels:
                        labels.append(step.label)
                    if gpu_index(value) >= gpu_index(devices.get(step.label, "cuda")):
                        devices[step.label] = value
    wanted = {section: labels for section, labels in wanted.items() if labels}
    if not wanted:
        return
    import torch

    if torch.cuda.is_available():
        beyond = [f"{label} ({device})" for label, device in devices.items()
                  if gpu_index(device) >= torch.cuda.device_count()]
        if beyond:
            raise AgecliError(f"{', '.join(beyond)} ask for a GPU this machine lacks: torch sees {gpus_here()}. "
                              "Change their device in the recipe, or with --set SECTION.device=cuda.")
        return
    fixes = " ".join(f"--set {section}.device=cpu" for section in wanted)
    labels = ", ".join(label for labels in wanted.values() for label in labels)
    raise AgecliError(f"{labels} ask for a CUDA GPU, but torch sees none on this machine. Run them on the "
                      f"CPU with {fixes} (expect far longer training), or on a machine with a GPU.")


def _prepare_resume(step: Step, run: Path, quiet: bool) -> None:
    """An interrupted named step: continue from its last.pt where the stage can resume,
    else move the unfinished folder aside so the step starts again under its own name."""
    kind = STAGE_KINDS[step.section]
    stage_dir = step.stage_dir(run)
    if not kind.many or stage_dir is None:
        return  # prepare / bench resume by themselves
    StageLock(stage_dir).check()   # another process writing it: neither resumed nor moved under it
    params = parameters(kind.function())
    if (stage_dir / "last.pt").exists() and "resume" in params:
        step.kwargs["resume"] = True
        log(f"  resuming {stage_dir} from last.pt", quiet)
        return
    aside = stage_dir.parent / unique_name(stage_dir.parent, f"{stage_dir.name}-unfinished")
    stage_dir.rename(aside)
    log(f"  {stage_dir} was unfinished with nothing to resume from; moved to {aside}", quiet)


SUPERSEDED_DIR = "superseded"


def _set_aside(step: Step, run: Path, quiet: bool) -> None:
    """A finished named step that runs again (what it read has changed): its folder moves to
    RUN/superseded/, out of the way of bench and report, so nothing it wrote is lost."""
    stage_dir = step.stage_dir(run)
    if not STAGE_KINDS[step.section].many or stage_dir is None or not stage_dir.is_dir():
        return  # bench re-runs in its own folder
    folds = (read_json(stage_dir / "manifest.json").get("results") or {}).get("folds") or []
    folders = [f for f in [stage_dir] + [stage_dir.parent / f["name"] for f in folds if f.get("name")] if f.is_dir()]
    for folder in folders:   # cross_validate: its fold models too
        StageLock(folder).check()
    for folder in folders:
        parent = run / SUPERSEDED_DIR / folder.parent.relative_to(run)
        parent.mkdir(parents=True, exist_ok=True)
        aside = parent / unique_name(parent, folder.name)
        folder.rename(aside)
        log(f"  {folder} runs again; its old results moved to {aside}", quiet)


def _reclaim_empty(step: Step, run: Path) -> None:
    """A step's folder left empty (or holding only a dead process's lock) by a run killed as it
    started: removed, so the step writes under its own name rather than NAME2, NAME3, ..."""
    stage_dir = step.stage_dir(run)
    if stage_dir is None or not STAGE_KINDS[step.section].many or not stage_dir.is_dir():
        return
    StageLock(stage_dir).check()
    if all(p.name.startswith(LOCK_NAME) for p in stage_dir.iterdir()):
        for lock in stage_dir.iterdir():
            lock.unlink()
        stage_dir.rmdir()


def _copy_recipe(recipe: Recipe, run: Path) -> None:
    if recipe.path is not None and recipe.path.resolve() == (run / RECIPE_FILE).resolve() and not recipe.overrides:
        return  # the run's own copy (a re-run from it): already there as is
    write_text(run / RECIPE_FILE, recipe_text(recipe))


def recipe_text(recipe: Recipe) -> str:
    """The recipe as run: its text, or with `--set` overrides the effective recipe, under a
    header saying where it came from."""
    header = ""
    if recipe.path is not None:
        header += f"# copied by `agecli run` from {recipe.path}\n"
    if recipe.overrides:
        header += "# with overrides: " + " ".join(f"--set {o}" for o in recipe.overrides) + "\n"
        header += "# effective recipe (overrides applied):\n"
        return header + yaml.safe_dump(recipe.data, sort_keys=False)
    return header + recipe.text


def frozen_recipe(recipe: Recipe, run: Path) -> Path:
    """RUN/logs/recipe-<hash>.yaml: the recipe as this invocation runs it, for its child
    processes. RUN/recipe.yaml is rewritten by any later `agecli run` on the run (another
    recipe, or the same one edited), so children started after that would read steps their
    parent never planned; a file named by its content never changes."""
    text = recipe_text(recipe)
    path = run / LOGS_DIR / f"recipe-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, text)
    return path


def read_state(run: Path) -> dict[str, Any]:
    """RUN/recipe-state.json: each recorded step's options fingerprint and seconds."""
    path = run / STATE_FILE
    return read_json(path) if path.exists() else {}


def _summarise(result: Any) -> Any:
    """Keep what a stage returned if it is plain data (for --json), else its repr."""
    try:
        return json.loads(json.dumps(result, default=json_default))
    except (TypeError, ValueError):
        return repr(result)[:200]
