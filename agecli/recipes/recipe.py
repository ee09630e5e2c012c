"""A recipe file: finding it, reading it (plain YAML), `--set` overrides, and its steps.

`Recipe` is the parsed file; `Step` is one call of a stage function that `plan`
(agecli.recipes.plan) makes from one entry of a section.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agecli.errors import AgecliError
from agecli.recipes.kinds import STAGE_KINDS, TOP_LEVEL_KEYS

RECIPE_FILE = "recipe.yaml"       # the run's own copy of the recipe it was made with
MAX_RECIPE_CHARS = 1 << 20        # the bundled recipes are a few kB
MAX_RECIPE_VALUES = 100_000       # keys and values once aliases are expanded


@dataclass
class Step:
    """One call of a library function: a stage, an entry name, and its keyword arguments."""

    section: str
    name: str | None
    options: dict[str, Any]                       # as written (after --set), before {run}/{root}
    kwargs: dict[str, Any] = field(default_factory=dict)   # resolved, ready to call

    @property
    def label(self) -> str:
        return f"{self.section}/{self.name}" if self.name else self.section

    def stage_dir(self, run: Path) -> Path | None:
        template = STAGE_KINDS[self.section].stage_dir
        return run / template.format(name=self.name) if template else None

    def fingerprint(self) -> str:
        text = json.dumps(self.options, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Recipe:
    path: Path | None
    data: dict[str, Any]                          # the parsed recipe, overrides applied
    text: str                                     # the file as written (copied into the run)
    overrides: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        return str(self.data.get("description", "")).strip()


def load_recipe(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe (a path, or the name of one bundled in `recipes/`) and apply `--set`s."""
    path = find_recipe(source)
    text = path.read_text(encoding="utf-8")
    data = parse_recipe(text, where=str(path))
    for item in overrides:
        apply_override(data, item)
    if overrides:
        check_expanded_size(data, f"{path} with --set")
    return Recipe(path=path, data=data, text=text, overrides=list(overrides))


def parse_recipe(text: str, where: str = "recipe") -> dict[str, Any]:
    """The recipe's mapping, read with `yaml.safe_load` (no tags that import code), refused when
    the text or what its aliases expand to is larger than any recipe (see `check_expanded_size`)."""
    if len(text) > MAX_RECIPE_CHARS:
        raise AgecliError(f"{where} is {len(text)} characters long; a recipe is at most {MAX_RECIPE_CHARS}. "
                          "Is it the right file?")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AgecliError(f"{where} is not valid YAML: {exc}. Recipes are plain YAML (no !tags).") from None
    except RecursionError:
        raise AgecliError(f"{where} nests too deeply to be a recipe.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AgecliError(f"{where} must be a mapping with one section per stage "
                          f"({', '.join(STAGE_KINDS)}), not a {type(data).__name__}.")
    check_expanded_size(data, where)
    return data


def check_expanded_size(data: Any, where: str) -> None:
    """Refuse a recipe whose values, with every alias expanded, exceed MAX_RECIPE_VALUES: YAML
    aliases make a few hundred bytes stand for billions of values (or a loop), and every later
    step (validation, fingerprints, the plan) walks them expanded."""
    budget, stack = MAX_RECIPE_VALUES, [data]
    while stack:
        item = stack.pop()
        budget -= 1
        if budget < 0:
            raise AgecliError(f"{where} expands to more than {MAX_RECIPE_VALUES} values (YAML aliases "
                              "repeating aliases, or one referring to itself); a recipe is far smaller. "
                              "Write the sections out, or share settings with a few plain anchors.")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def recipe_dirs() -> list[Path]:
    """Where bare recipe names are looked up: ./recipes, the recipes of a source checkout, then
    those an installed wheel carries (copied there by setup.py) and the sample's."""
    package = Path(__file__).resolve().parents[1]
    return [Path("recipes"), package.parent / "recipes", package / "recipes" / "bundled", package / "sample"]


def find_recipe(source: str | Path) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    if path.suffix in ("", ".yaml", ".yml") and len(path.parts) == 1:
        stem = path.stem if path.suffix else path.name
        for folder in recipe_dirs():
            for candidate in (folder / f"{stem}.yaml", folder / f"{stem}.yml"):
                if candidate.is_file():
                    return candidate
    known = sorted({p.stem for d in recipe_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    hint = f" Bundled recipes: {', '.join(known)}." if known else ""
    raise AgecliError(f"recipe {source} does not exist; give a path to a YAML file.{hint}")


def bundled_recipes() -> list[Path]:
    found: dict[str, Path] = {}
    for folder in recipe_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return [found[k] for k in sorted(found)]


# --------------------------------------------------------------------------- --set
def apply_override(data: dict[str, Any], item: str) -> None:
    """`--set section.key=value`, `section.ENTRY.key=value` (ENTRY: a name or an index) or,
    for list sections, `section.key=value` for every entry. Values are parsed as YAML."""
    if "=" not in item:
        raise AgecliError(f"--set {item!r} is not KEY=VALUE (e.g. --set train.epochs=2).")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise AgecliError(f"--set {item!r}: the value is not valid YAML ({exc}).") from None
    section = parts[0]
    if section in TOP_LEVEL_KEYS and len(parts) == 1:
        data[section] = value
        return
    if section not in STAGE_KINDS:
        raise AgecliError(f"--set {item!r}: unknown section {section!r}{did_you_mean(section, STAGE_KINDS)}; "
                          f"sections: {', '.join(STAGE_KINDS)}.")
    if len(parts) < 2:
        raise AgecliError(f"--set {item!r}: name a key, e.g. --set {section}.KEY=VALUE.")
    body = data.get(section)
    if body is None:
        body = [] if STAGE_KINDS[section].many else {}
        data[section] = body
    if isinstance(body, dict):
        if len(parts) != 2:
            raise AgecliError(f"--set {item!r}: section {section!r} has one entry; use {section}.KEY=VALUE.")
        body[parts[1]] = value
        return
    _override_entries(body, parts, value, item)


def _override_entries(entries: list, parts: list[str], value: Any, item: str) -> None:
    """`--set` on a list section: one entry (by name or index) or every entry."""
    section = parts[0]
    if len(parts) == 3:
        selector = parts[1]
        chosen = [e for i, e in enumerate(entries) if isinstance(e, dict)
                  and (str(e.get("name")) == selector or str(i) == selector)]
        if not chosen:
            names = [str(e.get("name", i)) for i, e in enumerate(entries) if isinstance(e, dict)]
            raise AgecliError(f"--set {item!r}: section {section!r} has no entry {selector!r}"
                              f"{did_you_mean(selector, names)}; entries: {', '.join(names) or 'none'}.")
        for entry in chosen:
            entry[parts[2]] = value
    elif len(parts) == 2:
        if not entries:
            raise AgecliError(f"--set {item!r}: section {section!r} has no entries to set {parts[1]!r} on.")
        for entry in entries:
            if isinstance(entry, dict):
                entry[parts[1]] = value
    else:
        raise AgecliError(f"--set {item!r}: use {section}.KEY=VALUE or {section}.ENTRY.KEY=VALUE.")


def did_you_mean(word: str, choices) -> str:
    """` (did you mean 'x'?)` for the closest of `choices`, or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
