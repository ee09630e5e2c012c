"""The bench's figures: error (or agreement) against latency with its Pareto front, error by
true age, and MAE per corruption and severity."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import pandas as pd

from agecli.stages.bench.candidates import REFERENCE

MARKERS = {"eager": "o", "compile": "s", "onnxruntime": "^"}
COLORS = {"teacher": "tab:red", "baseline": "tab:orange", "student": "tab:blue", "reference": "tab:gray",
          "model": "tab:green"}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (latency, error), both lower-is-better, by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def write_plots(out: Path, table: pd.DataFrame, by_age: pd.DataFrame | None, corr: pd.DataFrame | None,
                metric: str = "mae") -> dict[str, str]:
    """mae_vs_latency.png (or, without test labels, mae_vs_reference_vs_latency.png),
    error_by_age.png (labelled runs only) and corruptions.png; returns {stem: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agecli.rundir import atomic_path

    files = {}

    def save(fig, name):
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        plt.close(fig)
        files[name.removesuffix(".png")] = name

    ok = table[(table["status"] == "ok") & table["latency_ms"].notna() & table[metric].notna()] \
        if "latency_ms" in table and metric in table else table.iloc[0:0]
    if len(ok):
        save(_latency_figure(plt, table, ok, metric), "mae_vs_latency.png" if metric == "mae" else f"{metric}_vs_latency.png")
    if by_age is not None and len(by_age):
        save(_age_figure(plt, by_age), "error_by_age.png")
    if corr is not None and len(corr):
        save(_corruption_figure(plt, corr), "corruptions.png")
    return files


def _latency_figure(plt, table: pd.DataFrame, ok: pd.DataFrame, metric: str):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = list(zip(ok["latency_ms"], ok[metric]))
    for (_, r), (x, y) in zip(ok.iterrows(), pts):
        ax.scatter(x, y, marker=MARKERS.get(r["backend"], "o"), color=COLORS.get(r["role"], "k"), s=40)
        ax.annotate(f"{r['model']} ({r['backend']})", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = pareto_front(pts)
    ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="k", lw=1,
            ls="--", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(f"latency at batch {int(ok['latency_batch'].iloc[0])} (ms, median, log scale)")
    if metric == "mae":
        ax.set_ylabel("MAE on the test split (years)")
        ax.set_title("Error against latency (red teachers, blue students, grey reference)")
    else:
        ax.set_ylabel(f"mean |age - {REFERENCE} age| on the test faces (years)")
        ax.set_title(f"Agreement with the {REFERENCE} reference against latency (no test labels)")
        ref = table[(table["model"] == REFERENCE) & (table["status"] == "ok") & table["latency_ms"].notna()]
        for _, r in ref.iterrows():  # the reference has no value of its own: mark its latency
            ax.axvline(r["latency_ms"], color="tab:gray", ls=":", lw=1,
                       label=f"{REFERENCE} latency ({r['backend']})")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _age_figure(plt, by_age: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(7, 4))
    for model, part in by_age.groupby("model"):
        ax.plot(part["decade"], part["mae"], marker="o", label=model)
    ax.set_xlabel("true age (decade start; 80 = 80+)")
    ax.set_ylabel("MAE (years)")
    ax.set_title("Error by true age")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _corruption_figure(plt, corr: pd.DataFrame):
    names = list(dict.fromkeys(corr["corruption"]))
    cols = 5
    rows_n = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3 * cols, 2.4 * rows_n), sharey=True, squeeze=False)
    for ax, cname in zip(axes.flat, names):
        part = corr[corr["corruption"] == cname]
        for model, p in part.groupby("model"):
            line, = ax.plot(p["severity"], p["mae"], marker=".", label=model)
            ax.axhline(p["clean_mae"].iloc[0], color=line.get_color(), ls=":", lw=0.8)
        ax.set_title(cname, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.supxlabel("severity (dotted: clean MAE)")
    fig.supylabel("MAE (years)")
    fig.tight_layout()
    return fig
