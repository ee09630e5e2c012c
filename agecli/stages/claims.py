"""A paper's claims, checked against a run: the report's "Paper" section and RUN/claims.json.

    check_claims(claims)                   -> the claims, or AgecliError naming claims[i] and the key
    evaluate_claims(run, claims, paper)    -> {"paper", "claims", "results", "written"}, also RUN/claims.json
    saved_claims(run)                      -> (paper, claims) last evaluated in the run, or None

A claim either compares two sides (`better:` / `worse:`, one `metric:`) and gets a verdict,
or lists models (`models:`) as rows of a plain table (a paper's student table). A side or a
row is a selector `STAGE/NAME` (STAGE: train, distill, or bench for a bench.json row such as
the `dlib-age` reference); a trailing `*` gathers every model whose name starts with NAME, i.e.
its seeds (`train/ldae*`: ldae_s0, ldae_s1, ...). A side's figure is the mean over its
finished models with their range; a difference means something only when it is larger than
that seed spread. Nothing here fails on a run that is not finished: a model not there yet,
or a bench without it, is said so in the table.

Where each metric comes from (METRICS): `[val_|test_]KEY` from the stage's metrics.json
(KEY: mae, rmse, cs1..cs10, group_exact, group_1off, gender_accuracy; no prefix = test),
`agreement_mae` from a distill stage's metrics.json, `params` `gflops` `ms` `p95_ms`
`throughput` `file_mb` `mem_mb` from the model's bench.json row, and `corruption_mae`
`corruption_mae_rel` `noise_mae` `blur_mae` `weather_mae` `digital_mae` from bench.json's
robustness summary (a bench run with corruptions). Latency and memory depend on the backend:
a claim reads its bench rows from its `backend:`, else, when it reads a latency or memory, from
the first backend all its models were benched on, so they compare like with like.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from agecli.errors import AgecliError
from agecli.rundir import now, read_json, resolve_run, write_json

CLAIMS_FILE = "claims.json"
SELECTOR_STAGES = ("train", "distill", "bench")
# options that decide where and how fast a model trains, not which model it becomes
RUNTIME_OPTIONS = ("device", "threads", "workers", "resume", "val_batch_size")


# --------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class Metric:
    source: str                 # "metrics" (metrics.json), "bench" (a bench.json row), "robustness"
    path: tuple[str, ...]       # keys inside that source
    higher_is_better: bool
    label: str                  # column header


SPLIT_KEYS = ("mae", "rmse", *(f"cs{i}" for i in range(1, 11)), "group_exact", "group_1off", "gender_accuracy")
# agecli.data.corruptions.FAMILIES, written out so that naming a metric does not load OpenCV
# (tests/test_claims.py keeps the two equal)
FAMILIES = ("noise", "blur", "weather", "digital")
KEY_LABELS = {"mae": "MAE", "rmse": "RMSE", **{f"cs{i}": f"CS({i})" for i in range(1, 11)}}
# metric -> (bench.json row column, higher is better, label)
BENCH_COLUMNS = {"params": ("params_m", False, "params (M)"), "gflops": ("gflops", False, "GFLOPs"),
                 "ms": ("latency_ms", False, "ms"), "p95_ms": ("p95_ms", False, "p95 ms"),
                 "throughput": ("throughput", True, "faces/s"), "file_mb": ("file_mb", False, "file MB"),
                 "mem_mb": ("peak_mem_mb", False, "peak memory MB")}
# a bench row's own accuracy columns, for `bench/NAME` models that have no metrics.json
BENCH_ROW_ACCURACY = {"mae": "mae", "cs5": "cs5", "gender_accuracy": "gender_acc"}


def _metric_table() -> dict[str, Metric]:
    table: dict[str, Metric] = {}
    for key in SPLIT_KEYS:
        higher = key.startswith(("cs", "group_")) or key.endswith("accuracy")
        for split in ("val", "test"):
            label = f"{split} " + KEY_LABELS.get(key, key.replace("_", " "))
            table[f"{split}_{key}"] = Metric("metrics", (split, key), higher, label)
        table.setdefault(key, table[f"test_{key}"])
    table["agreement_mae"] = Metric("metrics", ("agreement_mae",), False, "MAE to the teacher")
    for name, (column, higher, label) in BENCH_COLUMNS.items():
        table[name] = Metric("bench", (column,), higher, label)
    table["corruption_mae"] = Metric("robustness", ("mce",), False, "corruption MAE")
    table["corruption_mae_rel"] = Metric("robustness", ("mce_relative",), False, "corruption / clean MAE")
    for family in FAMILIES:
        table[f"{family}_mae"] = Metric("robustness", ("by_family", family), False, f"{family} MAE")
    return table


METRICS = _metric_table()
METRIC_HELP = ("val_KEY or test_KEY from metrics.json (KEY: mae, rmse, cs1..cs10, group_exact, group_1off, "
               "gender_accuracy; KEY alone = test_KEY), agreement_mae (distill), "
               f"{', '.join(BENCH_COLUMNS)} (bench.json rows), "
               f"{', '.join(m for m, v in METRICS.items() if v.source == 'robustness')} (bench with corruptions)")
DEFAULT_METRIC = "test_mae"
TABLE_METRICS = ("test_mae", "params", "gflops", "ms", "corruption_mae")
BACKEND_METRICS = ("ms", "p95_ms", "throughput", "mem_mb")   # measured per backend


# --------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class Selector:
    stage: str
    name: str
    gather: bool                # a trailing `*`: every model whose name starts with `name`
    text: str

    def matches(self, name: str) -> bool:
        return name.startswith(self.name) if self.gather else name == self.name


COMPARISON_KEYS = ("claim", "paper", "better", "worse", "metric", "higher_is_better", "backend")
TABLE_KEYS = ("claim", "paper", "models", "reference", "metrics", "backend")
CLAIM_KEYS = tuple(dict.fromkeys(COMPARISON_KEYS + TABLE_KEYS))
# no square brackets in messages: the CLI prints errors through rich, which takes `[word]` for markup
EXAMPLE = ("e.g. {claim: 'LDAE beats regression', better: train/ldae*, worse: train/regression*, "
           "metric: test_mae}, or {claim: 'students', models: a list of selectors such as train/teacher "
           "and distill/student*}")


def _where(index: int, claim: Any) -> str:
    text = claim.get("claim") if isinstance(claim, dict) else None
    return f"claims[{index}]" + (f" ({str(text)[:60]!r})" if isinstance(text, str) and text else "")


def _close(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_selector(value: Any, where: str) -> Selector:
    """`STAGE/NAME` or `STAGE/NAME*` as a Selector, else AgecliError saying what a selector is."""
    text = value if isinstance(value, str) else ""
    stage, _, name = text.partition("/")
    gather = name.endswith("*")
    bare = name[:-1] if gather else name
    bad_name = any(c in bare for c in "*?[]/\\") or bare.startswith(".") or bare != bare.strip()
    if stage not in SELECTOR_STAGES or not (bare or gather) or bad_name:
        raise AgecliError(
            f"{where}: {value!r} is not a model selector; write STAGE/NAME with STAGE one of "
            f"{', '.join(SELECTOR_STAGES)}{_close(stage, SELECTOR_STAGES) if stage not in SELECTOR_STAGES else ''} "
            "and NAME a folder (train, distill) or bench.json model name, with at most one `*`, at its end, "
            "to gather the seeds (train/ldae* = ldae_s0, ldae_s1, ...).")
    return Selector(stage, bare, gather, text)


def _check_metric(value: Any, where: str) -> None:
    if value not in METRICS:
        raise AgecliError(f"{where}: unknown metric {value!r}{_close(str(value), METRICS)}; metrics: "
                          f"{METRIC_HELP}.")


def check_claim(index: int, claim: Any) -> dict[str, Any]:
    """One claim, validated; AgecliError names `claims[index]` and the key at fault."""
    where = _where(index, claim)
    if not isinstance(claim, dict):
        raise AgecliError(f"{where} must be a mapping, not {claim!r}; {EXAMPLE}.")
    is_table = "models" in claim
    allowed = TABLE_KEYS if is_table else COMPARISON_KEYS
    for key in claim:
        if key not in allowed:
            why = (f"not a key of a {'models:' if is_table else 'better:/worse:'} claim" if key in CLAIM_KEYS
                   else f"unknown{_close(str(key), CLAIM_KEYS)}")
            raise AgecliError(f"{where}: key {key!r}: {why}; keys: {', '.join(allowed)}.")
    if not isinstance(claim.get("claim"), str) or not claim["claim"].strip():
        raise AgecliError(f"{where}: key 'claim' is missing or empty: say in words what the paper claims.")
    for key in ("paper", "backend"):
        if claim.get(key) is not None and not isinstance(claim[key], (str, int, float)):
            raise AgecliError(f"{where}: key {key!r} must be text, not {claim[key]!r}.")
    (_check_table if is_table else _check_comparison)(claim, where)
    return claim


def _check_comparison(claim: dict[str, Any], where: str) -> None:
    for key in ("better", "worse"):
        if claim.get(key) is None:
            raise AgecliError(f"{where}: key {key!r} is missing; a claim compares `better:` with `worse:` "
                              f"(or lists `models:`), {EXAMPLE}.")
        parse_selector(claim[key], f"{where}: key {key!r}")
    _check_metric(claim.get("metric", DEFAULT_METRIC), f"{where}: key 'metric'")
    if not isinstance(claim.get("higher_is_better", False), bool):
        raise AgecliError(f"{where}: key 'higher_is_better' must be true or false, not {claim['higher_is_better']!r}.")


def _check_table(claim: dict[str, Any], where: str) -> None:
    models = claim["models"]
    if not isinstance(models, list) or not models:
        raise AgecliError(f"{where}: key 'models' must be a non-empty list of selectors such as "
                          "train/teacher and distill/student*.")
    for i, value in enumerate(models):
        parse_selector(value, f"{where}: key 'models'[{i}]")
    if claim.get("reference") is not None:
        parse_selector(claim["reference"], f"{where}: key 'reference'")
    metrics = claim.get("metrics", list(TABLE_METRICS))
    if not isinstance(metrics, list) or not metrics:
        raise AgecliError(f"{where}: key 'metrics' must be a non-empty list of metrics such as "
                          f"{', '.join(TABLE_METRICS)}.")
    for i, value in enumerate(metrics):
        _check_metric(value, f"{where}: key 'metrics'[{i}]")


def check_claims(claims: Any) -> list[dict[str, Any]]:
    """The claims list, each claim validated (what a recipe's dry run calls)."""
    if claims is None:
        return []
    if not isinstance(claims, list):
        raise AgecliError(f"claims must be a list of claims, not {claims!r}; {EXAMPLE}.")
    return [check_claim(i, claim) for i, claim in enumerate(claims)]


# --------------------------------------------------------------------------- models of a selector
@dataclass
class Member:
    name: str
    folder: Path | None         # the stage folder (None for a bench.json row)
    config: str | None          # what the model is, seed and runtime options aside


def model_config(manifest: dict[str, Any]) -> tuple[str, Any] | None:
    """(the model's configuration without its name, seed and runtime options, as JSON; its seed)
    for a complete stage manifest, else None. Two models with the same configuration differ
    only in their seed."""
    if manifest.get("status") != "complete" or not isinstance(manifest.get("args"), dict):
        return None
    args = {k: v for k, v in manifest["args"].items() if k != "name"}
    options = {k: v for k, v in (args.get("options") or {}).items() if k not in RUNTIME_OPTIONS}
    seed = options.pop("seed", None)
    args["options"] = options
    return json.dumps(args, sort_keys=True, default=str), seed


def _members(run: Path, sel: Selector, bench: dict[str, Any] | None) -> tuple[list[Member], list[str]]:
    """(the selector's finished models, the names of those not finished yet)."""
    if sel.stage == "bench":
        rows = (bench or {}).get("rows") or []
        names = list(dict.fromkeys(r.get("model") for r in rows if isinstance(r.get("model"), str)))
        return [Member(n, None, None) for n in names if sel.matches(n)], []
    folder = run / sel.stage
    found, unfinished = [], []
    for manifest_path in sorted(folder.glob("*/manifest.json")) if folder.is_dir() else []:
        name = manifest_path.parent.name
        if not sel.matches(name):
            continue
        try:
            config = model_config(read_json(manifest_path))
        except AgecliError:
            config = None
        if config is None:
            unfinished.append(name)
        else:
            found.append(Member(name, manifest_path.parent, config[0]))
    return found, unfinished


def _is_row_of(row: dict[str, Any], member: Member, stage: str) -> bool:
    """Whether a usable bench.json row measures this model: matched on its checkpoint path
    (RUN/STAGE/NAME/best.pt), or on its name for a `bench/NAME` model."""
    if row.get("status", "ok") != "ok":
        return False
    if stage == "bench":
        return row.get("model") == member.name
    parts = Path(str(row.get("path") or "")).parts
    return len(parts) >= 3 and parts[-3:-1] == (stage, member.name)


def _bench_row(member: Member, stage: str, bench: dict[str, Any], backend: str | None) -> dict[str, Any] | None:
    """The model's first usable bench.json row (of `backend` when given)."""
    for row in bench.get("rows") or []:
        if _is_row_of(row, member, stage) and (backend is None or row.get("backend") == backend):
            return row
    return None


def common_backend(run: Path, selectors: Sequence[str], bench: dict[str, Any] | None) -> str | None:
    """The first backend (in bench.json's order) that every benched model of `selectors` was
    benched on, so that their latencies compare like with like; None when there is none."""
    rows = (bench or {}).get("rows") or []
    per_model = []
    for selector in selectors:
        sel = parse_selector(selector, selector)
        for member in _members(run, sel, bench)[0]:
            backends = {r.get("backend") for r in rows if _is_row_of(r, member, sel.stage)}
            if backends:
                per_model.append(backends)
    order = dict.fromkeys(r.get("backend") for r in rows if r.get("status", "ok") == "ok")
    return next((b for b in order if b is not None and all(b in s for s in per_model)), None)


def _metrics_json_value(path: Path, metric: Metric) -> tuple[float | None, str | None]:
    if not path.exists():
        return None, "no metrics.json"
    try:
        value = _dig(read_json(path), metric.path)
    except AgecliError:
        return None, "metrics.json unreadable"
    return (value, None) if _number(value) else (None, f"no {'.'.join(metric.path)} in metrics.json")


def _dig(data: Any, path: Sequence[str]) -> Any:
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def member_value(member: Member, stage: str, metric: Metric, bench: dict[str, Any] | None,
                 backend: str | None) -> tuple[float | None, str | None, str | None]:
    """(the model's value of `metric`, None, the bench backend it was read from if any), or
    (None, why there is none, None)."""
    if metric.source == "metrics" and stage != "bench":
        return (*_metrics_json_value(member.folder / "metrics.json", metric), None)
    if bench is None:
        return None, "not benched yet (`agecli bench`)", None
    row = _bench_row(member, stage, bench, backend)
    if row is None:
        other = backend is not None and _bench_row(member, stage, bench, None) is not None
        return None, f"not benched on {backend}" if other else "not in bench.json", None
    if metric.source == "metrics":  # a bench/NAME model: its bench row holds its test accuracy
        column = BENCH_ROW_ACCURACY.get(metric.path[-1]) if metric.path[0] == "test" else None
        value = row.get(column) if column else None
    elif metric.source == "bench":
        value = row.get(metric.path[0])
    else:
        if not bench.get("robustness"):
            return None, "bench ran without --corruptions", None
        value = _dig((bench.get("robustness") or {}).get(row.get("model")), metric.path)
    if not _number(value):
        return None, f"no {metric.label} in bench.json", None
    return value, None, row.get("backend")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


# --------------------------------------------------------------------------- one side, one figure
def fmt_number(value: float | None, signed: bool = False, scale: float | None = None) -> str:
    """A figure with the digits its size calls for; `scale`: size them as a figure of this size
    (a difference of MAEs keeps the MAEs' two decimals)."""
    if value is None:
        return ""
    size = abs(value if scale is None else scale)
    digits = ".0f" if size >= 100 else ".2f" if size >= 1 else ".3g"
    return format(value, ("+" if signed else "") + digits)


def side_figure(run: Path, selector: str, metric_name: str, bench: dict[str, Any] | None,
                backend: str | None = None) -> dict[str, Any]:
    """A selector's figure for one metric: its models, mean, min, max, range and n (the models
    with a value), or `missing` saying why there is none; `text` is the table cell."""
    sel = parse_selector(selector, selector)
    metric = METRICS[metric_name]
    members, unfinished = _members(run, sel, bench)
    out: dict[str, Any] = {"selector": selector, "metric": metric_name, "models": [], "values": [],
                           "backends": [], "left_out": {}, "unfinished": unfinished, "seeds_only": True}
    for member in members:
        value, why, row_backend = member_value(member, sel.stage, metric, bench, backend)
        if why is None:
            out["models"].append(member.name)
            out["values"].append(float(value))
            if row_backend and row_backend not in out["backends"]:
                out["backends"].append(row_backend)
        else:
            out["left_out"][member.name] = why
    out["seeds_only"] = len({m.config for m in members if m.name in out["models"]}) <= 1
    values = out["values"]
    if values:
        out.update(mean=sum(values) / len(values), min=min(values), max=max(values), n=len(values))
        out["range"] = out["max"] - out["min"]
    out["missing"] = None if values else _missing(sel, members, unfinished, out["left_out"])
    # latency and memory depend on the backend: say which, unless the claim fixed one for all
    out["text"] = _side_text(out, show_backend=backend is None and metric_name in BACKEND_METRICS)
    return out


def _missing(sel: Selector, members: list[Member], unfinished: list[str], left_out: dict[str, str]) -> str:
    if left_out:
        return "; ".join(sorted(set(left_out.values())))
    if unfinished:
        return f"not finished yet ({', '.join(unfinished)})"
    if sel.stage == "bench":
        return f"no model {sel.text.partition('/')[2]} in bench.json (or not benched yet)"
    return "not run yet"


def _side_text(side: dict[str, Any], show_backend: bool = False) -> str:
    """`mean (min-max, n seeds)`, `value (1 seed)`, or why there is no figure."""
    if side["missing"]:
        return side["missing"]
    n = side["n"]
    mean, low, high = (fmt_number(side[k]) for k in ("mean", "min", "max"))
    text = (f"{mean} (1 seed)" if n == 1 else f"{mean} ({n} seeds, all equal)" if low == high
            else f"{mean} ({low}-{high}, {n} seeds)")
    notes = [f"backend {', '.join(side['backends'])}"] if show_backend and side["backends"] else []
    if side["left_out"]:
        notes.append(f"{len(side['left_out'])} left out: {'; '.join(sorted(set(side['left_out'].values())))}")
    if side["unfinished"]:
        notes.append(f"{len(side['unfinished'])} not finished")
    if not side["seeds_only"]:
        notes.append("models differ beyond their seed")
    return text + (f" [{', '.join(notes)}]" if notes else "")


# --------------------------------------------------------------------------- claims
def compare(run: Path, claim: dict[str, Any], bench: dict[str, Any] | None) -> dict[str, Any]:
    """A better:/worse: claim: both sides' figures, their difference, the seed spread, a verdict."""
    metric = claim.get("metric", DEFAULT_METRIC)
    higher = claim.get("higher_is_better", METRICS[metric].higher_is_better)
    backend = _backend(run, claim, [claim["better"], claim["worse"]], [metric], bench)
    better, worse = (side_figure(run, claim[k], metric, bench, backend) for k in ("better", "worse"))
    out = {"kind": "comparison", "claim": claim["claim"], "paper": _text(claim.get("paper")), "metric": metric,
           "higher_is_better": higher, "backend": backend, "better": better, "worse": worse,
           "difference": None, "spread": None, "verdict": "not run yet", "note": None}
    if better["missing"] or worse["missing"]:
        return out  # each side's `missing` says why
    difference = better["mean"] - worse["mean"]
    advantage = difference if higher else -difference   # > 0: the claimed-better side is better
    spread = max(better["range"], worse["range"])
    out.update(difference=difference, spread=spread)
    out["verdict"] = ("reproduced" if advantage > spread else "not reproduced" if -advantage > spread
                      else "within noise")
    if better["n"] == 1 and worse["n"] == 1:
        out["note"] = "one seed: no spread"
    return out


def table(run: Path, claim: dict[str, Any], bench: dict[str, Any] | None) -> dict[str, Any]:
    """A models: claim: one row per selector with each metric's figure, and the speed-up in
    batch-1 latency (`ms`) over the `reference:` model when one is named."""
    metrics = list(claim.get("metrics", TABLE_METRICS))
    reference = claim.get("reference")
    backend = _backend(run, claim, [*claim["models"], *([reference] if reference else [])],
                       [*metrics, *(["ms"] if reference else [])], bench)
    ref_ms = side_figure(run, reference, "ms", bench, backend) if reference else None
    rows = []
    for selector in claim["models"]:
        figures = {m: side_figure(run, selector, m, bench, backend) for m in metrics}
        row: dict[str, Any] = {"selector": selector, "metrics": figures}
        if reference:
            own_ms = figures.get("ms") or side_figure(run, selector, "ms", bench, backend)
            row["speedup"], row["speedup_missing"] = _speedup(ref_ms, own_ms)
        rows.append(row)
    return {"kind": "table", "claim": claim["claim"], "paper": _text(claim.get("paper")), "metrics": metrics,
            "labels": {m: METRICS[m].label for m in metrics}, "backend": backend, "reference": reference,
            "latency_batch": _latency_batch(bench), "rows": rows}


def _speedup(ref_ms: dict[str, Any], own_ms: dict[str, Any]) -> tuple[float | None, str | None]:
    """(reference latency / the model's, None), or (None, why there is none)."""
    if ref_ms["missing"] or own_ms["missing"]:
        return None, f"reference: {ref_ms['missing']}" if ref_ms["missing"] else own_ms["missing"]
    if ref_ms["backends"] != own_ms["backends"]:  # no backend common to all: do not mix them
        return None, f"benched on {', '.join(own_ms['backends'])}, the reference on {', '.join(ref_ms['backends'])}"
    return (ref_ms["mean"] / own_ms["mean"], None) if own_ms["mean"] > 0 else (None, "zero latency")


def _backend(run: Path, claim: dict[str, Any], selectors: list[str], metrics: list[str],
             bench: dict[str, Any] | None) -> str | None:
    """The bench backend a claim's figures are read from: its `backend:`, else, when it reads
    a latency or memory, the first one all its models were benched on (None: each model's first)."""
    if claim.get("backend") is not None:
        return str(claim["backend"])
    if not any(m in BACKEND_METRICS for m in metrics):
        return None
    return common_backend(run, selectors, bench)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _latency_batch(bench: dict[str, Any] | None) -> int | None:
    sizes = ((bench or {}).get("timing") or {}).get("batch_sizes") or []
    return sizes[0] if sizes else None


def evaluate_claims(run: str | os.PathLike | None, claims: list[dict[str, Any]] | None,
                    paper: str | None = None) -> dict[str, Any]:
    """Every claim against the run, written to RUN/claims.json (with the claims as given, so a
    later `agecli report` can evaluate them again) and returned."""
    run = resolve_run(run)
    claims = check_claims(claims)
    bench_path = run / "bench" / "bench.json"
    bench = read_json(bench_path) if bench_path.exists() else None
    results = [{"index": i, **(table if "models" in c else compare)(run, c, bench)} for i, c in enumerate(claims)]
    out = {"paper": paper, "claims": claims, "results": results, "written": now()}
    write_json(run / CLAIMS_FILE, out)
    return out


def saved_claims(run: Path) -> tuple[str | None, list[dict[str, Any]]] | None:
    """(paper, claims) last written to RUN/claims.json, or None when there is none."""
    path = run / CLAIMS_FILE
    if not path.exists():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise AgecliError(f"{path} is not a claims file (a mapping with 'claims'); delete it.")
    return data.get("paper"), data.get("claims") or []
