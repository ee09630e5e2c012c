"""Adding models to a finished bench (`bench(run, add=True)`, `agecli bench --add`).

A bench of 36 models takes hours on a small CPU; a new student should not re-measure them
all. With `add`, only the models named (or, without names, the run's finished models that
RUN/bench does not hold yet or whose file has changed since) are measured, and their rows
join the rows the bench already holds: table rows, corruption rows, error by age and the
robustness summary, matched by model name (a model measured again replaces its old rows).

Rows measured in separate benches compare only when they were measured alike: a setting
not given is taken from the finished bench, and one given otherwise (device, threads, batch
sizes, backends, timing or corruption options), another machine or re-prepared faces are
refused with what differs. Each row keeps when it was measured (`measured`), and bench.json
lists every bench that contributed (`benches`): latencies from different benches share a
machine and settings but not a moment, so a busy machine can still tilt them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from agecli.errors import AgecliError
from agecli.rundir import read_json
from agecli.stages.bench.candidates import REFERENCE, Candidate, candidates, discover_models, model_fingerprints
from agecli.stages.bench.measure import DEFAULT_SETTINGS

# bench options that must match for old and new rows to share a table
SAME_SETTINGS = tuple(DEFAULT_SETTINGS)
NEWER_SETTINGS = ("mirror",)   # settings benches recorded only from a later agecli on
# machine facts that must match (timings from another CPU or runtime do not compare)
SAME_MACHINE = ("cpu", "cpu_count", "gpu", "torch", "onnxruntime")


@dataclass
class PreviousBench:
    """A finished RUN/bench as written: its manifest, bench.json and tables."""

    dir: Path
    manifest: dict[str, Any]
    results: dict[str, Any]
    by_age: pd.DataFrame | None
    corruptions: pd.DataFrame | None

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.results.get("rows", [])

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(r["model"] for r in self.rows))


def read_previous(run: Path) -> PreviousBench | None:
    """RUN/bench when it finished (its manifest says complete), else None: a failed or
    interrupted bench's files are not trusted, and there is then nothing to add to."""
    folder = run / "bench"
    try:
        manifest = read_json(folder / "manifest.json")
        if manifest.get("status") != "complete":
            return None
        results = read_json(folder / "bench.json")
    except AgecliError:
        return None
    return PreviousBench(folder, manifest, results, _csv(folder / "error_by_age.csv"), _csv(folder / "corruptions.csv"))


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def settings(given: dict[str, Any], previous: PreviousBench | None) -> dict[str, Any]:
    """Each setting as given, else (None) the finished bench's when adding to one, else the default."""
    recorded = {} if previous is None else previous.manifest.get("args", {})
    return {key: given[key] if given.get(key) is not None else recorded.get(key, default)
            for key, default in DEFAULT_SETTINGS.items()}


def check_same_settings(previous: PreviousBench, args: dict[str, Any], machine: dict[str, Any],
                        test_faces: int, data: str) -> None:
    """Refuse to add rows measured differently from the bench's own, saying what differs."""
    old_args = previous.manifest.get("args", {})
    # a setting added since that bench was measured at its default there (mirror: not mirrored)
    old = {key: old_args.get(key, DEFAULT_SETTINGS[key] if key in NEWER_SETTINGS else None) for key in SAME_SETTINGS}
    differ = [f"{key}: {old[key]!r} there, {args.get(key)!r} now" for key in SAME_SETTINGS
              if _norm(old[key]) != _norm(args.get(key))]
    old_machine = previous.results.get("machine", {})
    differ += [f"machine {key}: {old_machine.get(key)!r} there, {machine.get(key)!r} here" for key in SAME_MACHINE
               if old_machine.get(key) != machine.get(key)]
    old_data = previous.results.get("data")
    if previous.results.get("test_faces") != test_faces or (old_data and old_data != data):
        differ.append("the run's faces: prepared again since that bench")
    if differ:
        raise AgecliError(f"--add would put rows measured differently into {previous.dir}'s table ("
                          + "; ".join(differ) + "). Bench with the same options on the same machine, or bench "
                          "without --add to measure every model again.")


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def models_to_add(run: Path, previous: PreviousBench, models: Sequence[str] | None, include_reference: bool,
                  labelled: bool) -> list[Candidate]:
    """The models this bench measures: those named, else the run's finished models that the
    bench lacks or that changed since. Without test labels the reference is measured again,
    since every model's agreement is computed against its predictions."""
    if models:
        cands = candidates(run, models, include_reference)
    else:
        recorded = previous.manifest.get("inputs", {})
        cands = [c for c in discover_models(run)
                 if recorded.get(c.name) != model_fingerprints([c]).get(c.name)]
        if include_reference and REFERENCE not in previous.models:
            cands.append(Candidate(REFERENCE, "reference", None))
    if cands and not labelled and include_reference and all(c.name != REFERENCE for c in cands):
        cands.append(Candidate(REFERENCE, "reference", None))
    return cands


def kept_models(previous: PreviousBench, measured: Sequence[str]) -> list[str]:
    """The bench's models that stay: not measured again, and their checkpoint still there."""
    gone = {r["model"] for r in previous.rows if r.get("path") and not Path(r["path"]).is_file()}
    return [m for m in previous.models if m not in set(measured) | gone]


def merge(previous: PreviousBench, keep: Sequence[str], rows: list[dict[str, Any]], by_age: pd.DataFrame | None,
          corruptions: pd.DataFrame | None, robust: dict[str, Any]):
    """(rows, error by age, corruption rows, robustness): the kept models' from the bench, then the new."""
    keep = set(keep)
    started = previous.manifest.get("started")
    old_rows = [dict(r, measured=r.get("measured", started)) for r in previous.rows if r["model"] in keep]
    old_robust = {m: s for m, s in previous.results.get("robustness", {}).items() if m in keep}
    return (old_rows + rows, _concat(previous.by_age, keep, by_age), _concat(previous.corruptions, keep, corruptions),
            {**old_robust, **robust})


def _concat(old: pd.DataFrame | None, keep: set[str], new: pd.DataFrame | None) -> pd.DataFrame | None:
    parts = [f for f in (None if old is None else old[old["model"].isin(keep)], new) if f is not None and len(f)]
    return pd.concat(parts, ignore_index=True) if parts else new


def history(previous: PreviousBench | None, started: str, measured: Sequence[str]) -> list[dict[str, Any]]:
    """Every bench whose rows the table holds: when it started and which models it measured."""
    past = [] if previous is None else previous.results.get("benches") or [
        {"started": previous.manifest.get("started"), "models": previous.models}]
    return [*past, {"started": started, "models": list(measured)}]
