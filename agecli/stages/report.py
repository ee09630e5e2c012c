"""A report per run: RUN/report.md, readable on its own, with every stage's tables and plots.

    write_report(run) -> Path of RUN/report.md

It reads what the stages left behind and invents nothing: the prepare manifest (counts,
alignment, splits), every train/distill/eval stage (manifest results, the last rows of
history.csv, learning-curve PNGs, metrics), and the bench stage (bench.json's rows as a
table, student/teacher speed-ups, robustness summary, its PNGs), plus the seed groups
(models that differ only in their seed, with their spread; `final_maes` is the one reader of
a stage's metrics.json). Stages that are missing or not complete are listed as such. Images are linked with paths relative to the run, so the
folder can be moved or zipped as a whole.

    write_report(run, paper="Antipov et al. 2017", claims=[{claim, paper, better, worse, metric}, ...])

adds, first, the paper's claims against the run (agecli.stages.claims: each side's mean over
its seeds, the difference, the seed spread, a verdict; or a plain table of models), also
written to RUN/claims.json. Called without `claims`, the report shows the claims last given
(RUN/claims.json), so `agecli report` and the report `agecli bench` writes keep the section.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from agecli.errors import AgecliError
from agecli.rundir import changed_reads, identify, read_json, resolve_run, shown_in_run, write_text
from agecli.stages.claims import evaluate_claims, fmt_number, model_config, saved_claims


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, default=str)
        return text if len(text) < 80 else text[:77] + "..."
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(rows: Iterable[dict[str, Any]], columns: list[str] | None = None) -> str:
    rows = list(rows)
    if not rows:
        return "_(empty)_\n"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _scalars(results: dict[str, Any]) -> list[dict[str, Any]]:
    flat = []
    for key, value in results.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                if not isinstance(v, (dict, list)):
                    flat.append({"result": f"{key}.{sub}", "value": v})
        elif not isinstance(value, list):
            flat.append({"result": key, "value": value})
    return flat


def _images(folder: Path, run: Path) -> list[str]:
    return [f"![{p.stem}]({os.path.relpath(p, run)})\n" for p in sorted(folder.glob("*.png"))]


def _stage_section(run: Path, folder: Path, title: str) -> list[str]:
    out = [f"### {title}\n"]
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        return out + ["_no manifest: this stage did not start properly._\n"]
    manifest = read_json(manifest_path)
    status = manifest.get("status")
    out.append(f"Status **{status}**, started {manifest.get('started')}, ended {manifest.get('ended')}.  \n"
               f"Command: `{manifest.get('command', '')}`\n")
    if manifest.get("error"):
        out.append(f"Error: `{manifest['error']}`\n")
    changed = changed_reads(manifest, run) if status == "complete" else []
    if changed:
        out.append(f"**Out of date:** {', '.join(f'`{shown_in_run(path, run)}`' for path in changed)} changed or went "
                   "since this stage read it, so its results describe the old one. Run it again (`agecli run` "
                   "with its recipe does so by itself).\n")
    results = manifest.get("results") or {}
    if results:
        out.append(md_table(_scalars(results), ["result", "value"]))
    history = folder / "history.csv"
    if history.exists():
        frame = pd.read_csv(history)
        out.append(f"\nTraining history ({len(frame)} epochs; last 5):\n\n")
        out.append(md_table(frame.tail(5).to_dict("records")))
    for name in ("metrics.json", "eval.json"):
        if (folder / name).exists():
            data = read_json(folder / name)
            if isinstance(data, dict):
                out.append(f"\n{name}:\n\n" + md_table(_scalars(data), ["result", "value"]))
    out.extend(_images(folder, run))
    return out


def final_maes(stage_dir: Path) -> tuple[float | None, float | None]:
    """(val MAE, test MAE) of a stage's final model, from its metrics.json
    ({"val": {...}, "test": {...}, ...} for train and distill alike)."""
    metrics_path = stage_dir / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.exists() else {}
    return (metrics.get("val") or {}).get("mae"), (metrics.get("test") or {}).get("mae")


def _seed_member(manifest_path: Path, stage: str) -> tuple[str, dict[str, Any]] | None:
    """(what the model's configuration is, without its seed and runtime options; its seed and
    MAEs) for a complete stage, else None."""
    config = model_config(read_json(manifest_path))
    if config is None:
        return None
    val_mae, test_mae = final_maes(manifest_path.parent)
    return stage + config[0], {"stage": stage, "name": manifest_path.parent.name, "seed": config[1],
                               "val_mae": val_mae, "test_mae": test_mae}


def seed_groups(run: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The run's models that differ only in their seed, one row per group of two or more: the
    mean and the range of their val and test MAE. A difference between two configurations has
    to beat this spread to mean anything."""
    run = resolve_run(run)
    groups: dict[str, list[dict[str, Any]]] = {}
    for stage in ("train", "distill"):
        for manifest_path in sorted((run / stage).glob("*/manifest.json")):
            member = _seed_member(manifest_path, stage)
            if member is not None:
                groups.setdefault(member[0], []).append(member[1])
    return [_seed_row(members) for members in groups.values() if len(members) >= 2]


def _seed_row(members: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"stage": members[0]["stage"], "models": " / ".join(m["name"] for m in members),
                           "seeds": ", ".join(str(m["seed"]) for m in members)}
    for split in ("val", "test"):
        values = [m[f"{split}_mae"] for m in members if m[f"{split}_mae"] is not None]
        if len(values) == len(members):  # a mean over some seeds only would mislead
            row.update({f"{split}_mae_mean": sum(values) / len(values), f"{split}_mae_min": min(values),
                        f"{split}_mae_max": max(values), f"{split}_mae_range": max(values) - min(values)})
    return row


# --------------------------------------------------------------------------- the report
def write_report(run: str | os.PathLike | None = None, *, paper: str | None = None,
                 claims: list[dict[str, Any]] | None = None) -> Path:
    """Write RUN/report.md from every stage present in the run; returns its path.

    `paper`: the paper's title; `claims`: what it claims, checked against the run (see
    agecli.stages.claims; None = the claims last given, from RUN/claims.json)."""
    run = resolve_run(run)
    lines = [f"# agecli report: {run.name}\n", f"Run directory: `{run}`\n"]
    lines += _claims_section(run, paper, claims)
    lines += _prepare_section(run)
    for number, stage, title in ((2, "train", "Trained models"), (3, "distill", "Distilled students"),
                                 (4, "eval", "Evaluations")):
        lines += _stages_section(run, number, stage, title)
    lines += _seeds_section(run)
    lines += _bench_section(run)
    path = run / "report.md"
    write_text(path, "\n".join(lines))
    return path


def _prepare_section(run: Path) -> list[str]:
    lines = ["## 1. Prepared faces\n"]
    prep = run / "prepare" / "manifest.json"
    if not prep.exists():
        return lines + ["_not prepared yet (`agecli prepare`)._\n"]
    manifest = read_json(prep)
    lines.append(f"Dataset **{manifest.get('dataset', '?')}**, status **{manifest.get('status')}**, "
                 f"label space {manifest.get('label_space', '?')}, protocol {manifest.get('protocol', '?')}.\n\n"
                 f"Alignment: `{json.dumps(manifest.get('alignment', {}))}`\n")
    if manifest.get("results"):
        lines.append(md_table(_scalars(manifest["results"]), ["result", "value"]))
    records = run / "prepare" / "records.csv"
    if records.exists():
        rec = pd.read_csv(records, usecols=lambda c: c in ("split", "age", "gender"))
        counts = rec.groupby("split").agg(faces=("split", "size"), mean_age=("age", "mean"),
                                          female=("gender", lambda g: float((g == 1).mean())))
        lines.append("\nFaces per split:\n\n" + md_table(counts.reset_index().to_dict("records")))
    rejects = run / "prepare" / "rejects.csv"
    if rejects.exists():
        rej = pd.read_csv(rejects)
        if len(rej):
            lines.append("\nRejected images by reason:\n\n" + md_table(
                rej.groupby("reason").size().rename("n").reset_index().to_dict("records")))
    return lines + _images(run / "prepare", run)


def _stages_section(run: Path, number: int, stage: str, title: str) -> list[str]:
    """One subsection per folder of RUN/STAGE (or RUN/STAGE itself when it is a stage)."""
    lines = [f"\n## {number}. {title}\n"]
    folders = sorted(p for p in (run / stage).glob("*") if p.is_dir()) if (run / stage).is_dir() else []
    if (run / stage / "manifest.json").exists():
        folders = [run / stage] + folders
    if not folders:
        lines.append(f"_none (`agecli {stage}`)._\n")
    for folder in folders:
        lines.extend(_stage_section(run, folder, f"{stage}/{folder.name}" if folder.name != stage else stage))
    return lines


def _seeds_section(run: Path) -> list[str]:
    groups = seed_groups(run)
    if not groups:
        return []
    return ["\n## 5. Seeds\n",
            "Models that differ only in their seed (runtime options such as device and threads "
            "aside): the spread a difference between configurations has to beat.\n\n",
            md_table(groups, ["stage", "models", "seeds", "val_mae_mean", "val_mae_range", "test_mae_mean",
                              "test_mae_min", "test_mae_max", "test_mae_range"])]


# bench.json row columns the report shows, where any row has a value
BENCH_COLUMNS = ["model", "role", "backend", "status", "input_size", "params_m", "gflops", "file_mb", "mae", "cs5",
                 "gender_acc", "mae_vs_reference", "test_seen", "latency_ms", "p95_ms", "throughput", "peak_mem_mb", "mce",
                 "mce_rel", "error"]


def _bench_section(run: Path) -> list[str]:
    lines = ["\n## 6. Benchmark\n"]
    bench_json = run / "bench" / "bench.json"
    if not bench_json.exists():
        return lines + ["_not benchmarked yet (`agecli bench`)._\n"]
    data = read_json(bench_json)
    lines.append(_bench_setting(data))
    changed = _changed_since_bench(run, data)
    if changed:
        lines.append(f"**Out of date:** {', '.join(f'`{m}`' for m in changed)} changed since this bench "
                     "measured them; `agecli bench --add --models` them (or `agecli run`) to measure them again.\n\n")
    if data.get("accuracy", "labels") != "labels":
        lines.append(f"**No age labels on the test faces.** Accuracy: {data.get('accuracy_note', '')}. "
                     "For the same reason there is no error-by-true-age plot and no robustness table.\n\n")
    rows = data.get("rows", [])
    lines.append(md_table(rows, [c for c in BENCH_COLUMNS if any(r.get(c) is not None for r in rows)]))
    if data.get("speedups"):
        lines.append("\nSpeed-up of each student over each teacher (latency ratio, same process):\n\n")
        lines.append(md_table(data["speedups"]))
    if data.get("robustness"):
        lines.append("\nRobustness to ImageNet-C corruptions (mCE = mean MAE over corruptions and "
                     "severities; relative = mCE / clean MAE on the same faces):\n\n")
        lines.append(md_table([{"model": m, **{k: v for k, v in s.items() if not isinstance(v, dict)},
                                **{f"{f}": v for f, v in s.get("by_family", {}).items()}}
                               for m, s in data["robustness"].items()]))
    if isinstance(data.get("plots"), dict):  # this bench's plots only, not stale files of an older one
        lines.extend(f"![{Path(f).stem}](bench/{f})\n" for f in data["plots"].values()
                     if (run / "bench" / f).exists())
    else:
        lines.extend(_images(run / "bench", run))
    return lines


def _changed_since_bench(run: Path, data: dict[str, Any]) -> list[str]:
    """The benched models whose file is not the one measured (the bench records each file's hash).
    A model inside the benched run is looked for inside this run, wherever it now is."""
    manifest = run / "bench" / "manifest.json"
    recorded = (read_json(manifest).get("inputs") or {}) if manifest.exists() else {}
    benched_run = Path(data.get("run") or run)
    changed = []
    for row in data.get("rows", []):
        path = Path(row.get("path") or "")
        if row.get("model") not in recorded or not row.get("path") or row["model"] in changed:
            continue
        try:
            path = run / path.relative_to(benched_run)
        except ValueError:
            pass
        if path.is_file() and identify(path) != recorded[row["model"]]:
            changed.append(row["model"])
    return changed


def _bench_setting(data: dict[str, Any]) -> str:
    """Where and how the bench timed: device, threads, versions, faces, repeats, memory method."""
    machine = data.get("machine", {})
    timing = data.get("timing", {})
    return (f"Device **{data.get('device')}** ({machine.get('gpu') or machine.get('cpu', '?')}), "
            f"{data.get('threads')} torch threads, torch {machine.get('torch')}, onnxruntime "
            f"{machine.get('onnxruntime')}. {data.get('test_faces')} test faces. Latency: median and p95 of "
            f"{timing.get('repeats')} calls at batch {timing.get('batch_sizes', [1])[0]} after {timing.get('warmup')} "
            f"warm-up calls ({timing.get('clock')}); throughput at batch {timing.get('batch_sizes', [0])[-1]}. "
            f"Memory: {', '.join(timing.get('memory', []))}."
            + (" Every model answered each face as the mean over it and its mirror image (`--mirror`): "
               "errors are of those answers, and each call ran both images of every face." if data.get("mirror") else "")
            + "\n\n")


# --------------------------------------------------------------------------- the paper's claims
def _claims_section(run: Path, paper: str | None, claims: list[dict[str, Any]] | None) -> list[str]:
    """The paper's claims against this run (first: it is what a reproduction is read for)."""
    if claims is None:
        return _saved_claims_section(run, paper)
    return _render_claims(paper, evaluate_claims(run, claims, paper)["results"])


def _saved_claims_section(run: Path, paper: str | None) -> list[str]:
    """The claims last given (RUN/claims.json), evaluated again. A file that no longer reads or
    validates is said so rather than failing the report (`agecli bench` writes one at its end)."""
    try:
        saved = saved_claims(run)
        if saved is None:
            return []
        paper = paper or saved[0]
        results = evaluate_claims(run, saved[1], paper)["results"]
    except AgecliError as exc:
        return ["\n## Paper\n", f"_The claims in claims.json were not evaluated: {exc}_\n"]
    return _render_claims(paper, results)


CLAIMS_NOTE = ("Each claim of the paper against this run. Our figure is the mean over a selector's models "
               "(its seeds) with their range; the claim is **reproduced** when the claimed-better side wins "
               "by more than the seed spread (the larger of the two ranges), **not reproduced** when the other "
               "side does, **within noise** otherwise. Difference = better - worse.\n\n")
COMPARISON_COLUMNS = ["claim", "paper", "metric", "better (ours)", "worse (ours)", "difference", "seed spread",
                      "verdict"]


def _render_claims(paper: str | None, results: list[dict[str, Any]]) -> list[str]:
    if not results and not paper:
        return []
    lines = [f"\n## Paper: {paper}\n" if paper else "\n## Claims\n"]
    if not results:
        lines.append("_no claims given (`report: {claims: [...]}` in the recipe)._\n")
    comparisons = [r for r in results if r["kind"] == "comparison"]
    if comparisons:
        # a recipe of agecli's own claims (no paper quoted) gets no empty "paper" column
        columns = [c for c in COMPARISON_COLUMNS if c != "paper" or any(r["paper"] for r in comparisons)]
        note = CLAIMS_NOTE if paper else CLAIMS_NOTE.replace("Each claim of the paper", "Each claim")
        lines += [note, md_table([_comparison_row(r) for r in comparisons], columns)]
    for result in results:
        if result["kind"] == "table":
            lines += _claim_table(result)
    return lines + ["\nThe same as JSON: `claims.json`.\n"] if results else lines


def _comparison_row(result: dict[str, Any]) -> dict[str, Any]:
    direction = "higher" if result["higher_is_better"] else "lower"
    verdict = result["verdict"] + (f" ({result['note']})" if result["note"] else "")
    metric = result["metric"] + (f", {result['backend']} backend" if result["backend"] else "")
    scale = max(abs(result[side].get("mean") or 0) for side in ("better", "worse"))
    return {"claim": result["claim"], "paper": result["paper"], "metric": f"{metric} ({direction} is better)",
            "better (ours)": f"{result['better']['selector']}: {result['better']['text']}",
            "worse (ours)": f"{result['worse']['selector']}: {result['worse']['text']}",
            "difference": fmt_number(result["difference"], signed=True, scale=scale),
            "seed spread": fmt_number(result["spread"], scale=scale),
            "verdict": verdict}


def _claim_table(result: dict[str, Any]) -> list[str]:
    """A models: claim as its own table: one row per selector, one column per metric."""
    lines = [f"\n### {result['claim']}\n"]
    if result["paper"]:
        lines.append(f"Paper: {result['paper']}\n\n")
    labels = dict(result["labels"])
    if "ms" in labels and result["latency_batch"] is not None:
        labels["ms"] = f"ms (batch {result['latency_batch']})"
    speedup = f"speed-up over {result['reference']}" if result["reference"] else None
    columns = ["model", *(labels[m] for m in result["metrics"]), *([speedup] if speedup else [])]
    rows = []
    for row in result["rows"]:
        cells = {"model": row["selector"], **{labels[m]: row["metrics"][m]["text"] for m in result["metrics"]}}
        if speedup:
            cells[speedup] = f"{row['speedup']:.2f}x" if row["speedup"] is not None else row["speedup_missing"]
        rows.append(cells)
    notes = [f"Latency and memory: the {result['backend']} backend." if result["backend"] else
             "Bench figures: each model's first benched backend."]
    if speedup:
        notes.append(f"Speed-up: the reference's latency / the model's, both at batch {result['latency_batch']} "
                     "in the same bench.")
    return lines + [md_table(rows, columns), "\n" + " ".join(notes) + "\n"]
