"""From a recipe to checked steps: every key and value validated against the real stage
signatures (agecli.recipes.signatures) and registries before anything runs, `{run}` and
`{root}` filled in, and the call each step makes."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from agecli.errors import AgecliError
from agecli.progress import ProgressFn
from agecli.recipes.kinds import STAGE_KINDS, TOP_LEVEL_KEYS, StageKind
from agecli.recipes.recipe import Recipe, Step, did_you_mean
from agecli.recipes.signatures import RUNNER_FILLED, Param, bind, parameters, takes_var_keyword, type_problem
from agecli.rundir import check_name


def plan(recipe: Recipe, run: str | Path, root: str | Path | None = None) -> list[Step]:
    """Validate every section against the real library signatures and return the steps in
    the order they run. Raises AgecliError naming the first problem found (with all of its
    section's problems)."""
    data = recipe.data
    where = str(recipe.path) if recipe.path else "recipe"
    _check_sections(data, where)
    steps: list[Step] = []
    for section, kind in STAGE_KINDS.items():
        if section not in data or data[section] is None:
            continue
        entries = _entries(kind, data[section], where)
        params = section_parameters(kind)
        section_steps: list[Step] = []
        for i, entry in enumerate(entries):
            step = _step(kind, i, entry, section_steps, where)
            _validate(step, params, kind, where, root)
            _check_placeholders(step, where)
            step.kwargs = _resolve(step.options, run=Path(run), root=root)
            _check_resolved(step, where)
            section_steps.append(step)
        _check_order(section_steps, Path(run), where)
        steps.extend(section_steps)
    if not steps:
        raise AgecliError(f"{where} has no stages; give at least one of {', '.join(STAGE_KINDS)}.")
    _check_run_paths(steps, Path(run), where)
    return steps


def _check_sections(data: dict[str, Any], where: str) -> None:
    for key in data:
        if key not in STAGE_KINDS and key not in TOP_LEVEL_KEYS:
            raise AgecliError(
                f"{where}: unknown section {key!r}{did_you_mean(key, [*STAGE_KINDS, *TOP_LEVEL_KEYS])}. "
                f"Sections: {', '.join(STAGE_KINDS)} (plus {', '.join(TOP_LEVEL_KEYS)}).")


def _entries(kind: StageKind, body: Any, where: str) -> list[Any]:
    """A section's entries: its list (or single mapping) for list stages, else the one mapping."""
    if kind.many:
        return body if isinstance(body, list) else [body]
    if not isinstance(body, dict):
        raise AgecliError(f"{where}: section {kind.section!r} must be a mapping of options, "
                          f"not a {type(body).__name__}.")
    return [body]


def _step(kind: StageKind, i: int, entry: Any, earlier: list[Step], where: str) -> Step:
    """Entry `i` of a section as a Step; list stages need a `name:` unique in the section."""
    section = kind.section
    if not isinstance(entry, dict):
        raise AgecliError(f"{where}: entry {i} of section {section!r} must be a mapping of options, "
                          f"not {entry!r}.")
    name = None
    if kind.many:
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise AgecliError(f"{where}: entry {i} of section {section!r} needs a `name:` (its folder "
                              f"RUN/{kind.stage_dir.format(name='NAME')}, used to resume and to refer to it).")
        check_name(name, f"{where}: the name of entry {i} of section {section!r},")
        if name in {step.name for step in earlier}:
            raise AgecliError(f"{where}: two {section} entries are named {name!r}; names must be unique.")
    return Step(section, name, dict(entry))


def section_parameters(kind: StageKind) -> dict[str, Param]:
    """The keys a section accepts: its function's, plus those it forwards through **kwargs."""
    params = parameters(kind.function())
    if kind.forwards and takes_var_keyword(kind.function()):
        for key, param in parameters(STAGE_KINDS[kind.forwards].function()).items():
            if key not in kind.fixed:
                params.setdefault(key, dataclasses.replace(param, required=False))
    return params


def _check_order(section_steps: list[Step], run: Path, where: str) -> None:
    for i, step in enumerate(section_steps):
        later = [s.label for s in needs(step, section_steps[i + 1:], run)]
        if later:
            raise AgecliError(f"{where}: [{step.label}] reads the output of {', '.join(later)}, which the "
                              f"recipe lists after it; move {step.label} below {later[-1]}.")


def needs(step: Step, others: Sequence[Step], run: Path) -> list[Step]:
    """The steps among `others` whose folder `step` reads, e.g. `init: "{run}/train/NAME/best.pt"`,
    or the same path written out (relative or absolute). Sections already run in order; this
    orders the steps inside one (and waits under --jobs)."""
    read = {folder.resolve() for value in step.kwargs.values()
            for text in (value if isinstance(value, list) else [value])
            if (folder := _stage_folder(text, run)) is not None}
    return [other for other in others
            if other is not step and (folder := other.stage_dir(run)) is not None and folder.resolve() in read]


# --------------------------------------------------------------------------- validation
def _validate(step: Step, params: dict[str, Param], kind: StageKind, where: str, root) -> None:
    label = f"{where}: [{step.label}]"
    problems: list[str] = []
    valid = sorted(params)
    for key, value in step.options.items():
        if key in RUNNER_FILLED:
            problems.append(f"{key!r} is set by `agecli run` (use --run DIR), not in the recipe")
        elif key not in params:
            problems.append(f"unknown key {key!r}{did_you_mean(key, valid)}")
        else:
            wants = type_problem(value, params[key].annotation)
            if wants:
                problems.append(f"{key!r} must be {wants}, not {value!r}")
    if not problems:
        problems += _check_values(step)
    supplied = set(step.options) | ({"root"} if root is not None else set())
    missing = [p.name for p in params.values() if p.required and p.name not in supplied]
    if "root" in missing:
        problems.append("'root' is required: pass --root DATA (or set root: in the section)")
        missing.remove("root")
    if missing:
        problems.append("missing required " + ", ".join(map(repr, missing)))
    if problems:
        raise AgecliError(f"{label} " + "; ".join(problems) + f".\nValid keys for {step.section} "
                          f"({kind.target()}): {', '.join(valid)}.")


def _check_name(registry: str, attr: str) -> Callable[[Any], None]:
    """A check that a value (or each value of a list) is a key of `registry.attr`."""
    def check(value: Any) -> None:
        known = getattr(importlib.import_module(registry), attr)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item not in known:
                raise AgecliError(f"{item!r} is not one of {', '.join(map(str, known))}"
                                  f"{did_you_mean(item, known)}")
    return check


def _check_arch(value: Any) -> None:
    from agecli.modeling.backbones import resolve_arch

    resolve_arch(value)


def _check_claims(value: Any) -> None:
    from agecli.stages.claims import check_claims

    check_claims(value)


# Values a dry run can check without running anything: names looked up in the registries,
# and the report's paper claims (keys, selectors, metric names).
VALUE_CHECKS: dict[tuple[str, str], Callable[[Any], None]] = {
    ("prepare", "dataset"): _check_name("agecli.data.datasets", "DATASETS"),
    ("prepare", "detector"): _check_name("agecli.options", "DETECTORS"),
    ("prepare", "template"): _check_name("agecli.data.faces", "TEMPLATES"),
    ("train", "arch"): _check_arch,
    ("cross_validate", "arch"): _check_arch,
    ("distill", "student"): _check_arch,
    ("train", "encoding"): _check_name("agecli.modeling.encodings", "ENCODINGS"),
    ("cross_validate", "encoding"): _check_name("agecli.modeling.encodings", "ENCODINGS"),
    ("distill", "encoding"): _check_name("agecli.modeling.encodings", "ENCODINGS"),
    ("distill", "method"): _check_name("agecli.options", "METHODS"),
    ("bench", "backends"): _check_name("agecli.stages.bench", "BACKENDS"),
    ("report", "claims"): _check_claims,
}


def _check_values(step: Step) -> list[str]:
    problems = []
    for key, value in step.options.items():
        check = VALUE_CHECKS.get((step.section, key))
        if check is None or value is None:
            continue
        try:
            check(value)
        except AgecliError as exc:
            problems.append(f"{key}: {str(exc).rstrip('.')}")
        except (ImportError, AttributeError):
            continue  # the registry moved: the stage itself will check
    return problems


def _resolve(options: dict[str, Any], *, run: Path, root) -> dict[str, Any]:
    """Substitute {run} and {root} in strings (and inside lists)."""
    mapping = {"run": str(run), "root": str(root) if root is not None else "{root}"}

    def sub(value: Any) -> Any:
        if isinstance(value, str) and "{" in value:
            try:
                return value.format(**mapping)
            except (KeyError, IndexError, ValueError):
                return value
        if isinstance(value, list):
            return [sub(v) for v in value]
        return value

    return {k: sub(v) for k, v in options.items()}


PLACEHOLDERS = ("run", "root")


def _check_placeholders(step: Step, where: str) -> None:
    """A `{rn}` typo would otherwise stay in the path and fail when the step runs, hours in."""
    for key, value in step.options.items():
        for text in value if isinstance(value, list) else [value]:
            unknown = [field for field in re.findall(r"\{([^{}]*)\}", text)
                       if field not in PLACEHOLDERS] if isinstance(text, str) else []
            if unknown:
                raise AgecliError(f"{where}: [{step.label}] {key}: {text!r} has {{{unknown[0]}}}"
                                  f"{did_you_mean(unknown[0], PLACEHOLDERS)}; a recipe fills in only "
                                  f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}.")


def _check_resolved(step: Step, where: str) -> None:
    """A brace left after {run} and {root} are filled in is a typo (`{run/x`, `{{run}}`) or a
    {root} without --root; either would fail only when the step runs."""
    for key, value in step.kwargs.items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and ("{" in text or "}" in text):
                hint = ("pass --root DATA" if "{root}" in text else
                        "write {run} or {root} with one brace on each side")
                raise AgecliError(f"{where}: [{step.label}] {key}: {text!r} still holds a brace once placeholders "
                                  f"are filled in; {hint}.")


def _check_run_paths(steps: list[Step], run: Path, where: str) -> None:
    """Each path into the run's stage folders (a teacher's best.pt, an init) must be written by
    an earlier step of the recipe or exist already; else the step would fail after the ones
    before it had run."""
    written: dict[Path, Step] = {}
    for step in steps:
        for key, value in step.kwargs.items():
            for text in value if isinstance(value, list) else [value]:
                folder = _stage_folder(text, run)
                if folder is None or folder in written or Path(text).exists():
                    continue
                names = [s.label for s in written.values()]
                raise AgecliError(
                    f"{where}: [{step.label}] {key}: {text} is written by no step before it and does not exist yet"
                    f"{did_you_mean(str(folder.relative_to(run)), names)}. "
                    f"Earlier steps write: {', '.join(names) or 'nothing'}; name one of them, or a file that exists.")
        if STAGE_KINDS[step.section].many:
            written[step.stage_dir(run)] = step


def _stage_folder(value: Any, run: Path) -> Path | None:
    """RUN/<stage>/<name> for a path into a named stage's folder (train, distill, eval), else None.
    The path may be written as the run is or resolved (relative to here, or absolute)."""
    if not isinstance(value, str) or not value:
        return None
    parts = _inside_run(Path(value), run)
    named = {kind.stage_dir.split("/")[0] for kind in STAGE_KINDS.values() if kind.many}
    return run / parts[0] / parts[1] if parts and len(parts) >= 2 and parts[0] in named else None


def _inside_run(path: Path, run: Path) -> tuple[str, ...] | None:
    """`path`'s parts below `run`, comparing them as written and then resolved; None if outside."""
    for inner, outer in ((path, run), (path.resolve(), run.resolve())):
        try:
            return inner.relative_to(outer).parts
        except ValueError:
            continue
    return None


# --------------------------------------------------------------------------- the call
def call_arguments(step: Step, run: Path, root, progress: ProgressFn | None) -> tuple[Callable, dict[str, Any]]:
    """The function of a step and the keyword arguments to call it with (options dataclass
    parameters are built from their fields)."""
    kind = STAGE_KINDS[step.section]
    func = kind.function()
    remaining = dict(step.kwargs)
    kwargs = bind(func, remaining, run=run, root=root, progress=progress)
    if (step.section == "distill" and kwargs.get("unlabelled") is not None and run is not None
            and Path(kwargs["unlabelled"]).resolve() == Path(run).resolve()):
        # `unlabelled: "{run}"`: the run's own faces are the unlabelled set (a `folder` run);
        # passing the run as both would read every face twice
        kwargs["run"] = None
    if remaining and kind.forwards and takes_var_keyword(func):
        forwarded = bind(STAGE_KINDS[kind.forwards].function(), remaining, run=None, root=root, progress=None)
        kwargs.update({k: v for k, v in forwarded.items() if k not in RUNNER_FILLED})
    return func, kwargs
