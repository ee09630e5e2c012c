"""Export a checkpoint for deployment: ONNX or TorchScript, checked against PyTorch.

    export("runs/utkface/distill/mobilenet/best.pt", format="onnx")
    export(path, format="onnx", quantize="int8")     # + an int8 copy, calibrated on val faces (CPU)
    load_exported("student.onnx")                    -> Exported(spec, run(x01) -> outputs)

The exported graph is a wrapper around the model (`DeployWrapper`):

    input   images      float32 (N, 3, S, S), RGB in [0, 1], S = spec.input_size (batch axis dynamic)
    outputs age         float32 (N,)   predicted age in years
            female_prob float32 (N,)   only when the model has a gender head
            age_raw     float32 (N, K) the encoding's raw head outputs (logits / score)

Normalisation (the checkpoint's mean/std) is inside the graph. The full `ModelSpec` travels
with the file: ONNX `metadata_props["agecli_spec"]` (JSON), TorchScript extra file
`agecli_spec.json`. `agecli_inference` (JSON, see `inference_metadata`) says in numbers how
to feed and read the model without agecli: input size, channel order, mean/std, the crop
(five-point template in crop pixels, margin, crop size) and how each output decodes;
docs/onnx_standalone.py uses it with onnxruntime, OpenCV and numpy alone.

Parity: the export is run on real aligned faces of the run's store (test split, else the
model's own run; without a prepared run, the faces of the photos bundled with agecli) and
compared with PyTorch: the largest absolute difference in predicted age and the MAE
difference are reported, and the export fails above `tolerance` years.

Files: the export never writes over its checkpoint, refuses an existing --out unless
`force`, and is checked before it is renamed into place, so a failed parity check leaves
whatever was at --out untouched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from agecli.data import batches
from agecli.engine.timing import time_call
from agecli.errors import AgecliError
from agecli.modeling.checkpoint import ModelSpec, load_checkpoint, read_checkpoint, sniff
from agecli.modeling.decode import decode
from agecli.modeling.zoo import WEIGHTS_DIR, resolve_checkpoint
from agecli.rundir import atomic_path, check_writable, fingerprint_file

EXPORT_FORMAT = "agecli.export"
PARITY_TOLERANCE = 0.05  # years: largest |age_export - age_torch| allowed for fp32 exports
CALIBRATION_FACES = 256  # faces whose activation ranges fix the int8 copy's scales


class DeployWrapper(nn.Module):
    """images in [0, 1] -> (age, [female_prob], age_raw); normalisation included."""

    def __init__(self, model: nn.Module, spec: ModelSpec):
        super().__init__()
        self.model = model
        self.encoding = spec.build_encoding()
        self.gender = bool(spec.gender)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor):
        out = self.model((images - self.mean) / self.std)
        age, female = decode(out, self.encoding)
        raw = out["age"].float()
        return (age, female, raw) if self.gender else (age, raw)


def output_names(spec: ModelSpec) -> list[str]:
    return ["age", "female_prob", "age_raw"] if spec.gender else ["age", "age_raw"]


# --------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str
    write: Callable[[nn.Module, ModelSpec, Path, dict[str, str]], None]
    cpu: bool = True
    gpu: bool = True
    quantize: bool = False  # supports --quantize int8


def _write_onnx(wrapper: nn.Module, spec: ModelSpec, path: Path, metadata: dict[str, str]) -> None:
    names = output_names(spec)
    example = torch.rand(2, 3, spec.input_size, spec.input_size)
    axes = {"images": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(wrapper, (example,), str(path), input_names=["images"], output_names=names,
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        except TypeError:  # very old torch without the dynamo switch
            torch.onnx.export(wrapper, (example,), str(path), input_names=["images"], output_names=names,
                              dynamic_axes=axes, opset_version=17)
    add_onnx_metadata(path, metadata)


def _write_torchscript(wrapper: nn.Module, spec: ModelSpec, path: Path, metadata: dict[str, str]) -> None:
    example = torch.rand(2, 3, spec.input_size, spec.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={k + ".json" if k == "agecli_spec" else k: v
                                                   for k, v in metadata.items()})


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("onnx", ".onnx", _write_onnx, quantize=True),
    ExportFormat("torchscript", ".torchscript", _write_torchscript),
)}


def get_format(name: str) -> ExportFormat:
    if str(name).lower() not in FORMATS:   # ONNX as well as onnx
        raise AgecliError(f"unknown export format {name!r}; choose one of: {', '.join(FORMATS)}.")
    return FORMATS[str(name).lower()]


def add_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Append `metadata_props` entries to an ONNX file without needing the `onnx` package:
    a serialised protobuf may be extended by appending fields (ModelProto field 14,
    StringStringEntryProto key=1 value=2)."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def field(number: int, payload: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    extra = b"".join(field(14, field(1, k.encode()) + field(2, v.encode())) for k, v in metadata.items())
    with open(path, "ab") as handle:
        handle.write(extra)


# --------------------------------------------------------------------------- running exports
@dataclass
class Exported:
    """A loaded export: `run(x01)` takes float32 (N, 3, S, S) in [0, 1] and returns a dict of arrays."""

    path: Path
    format: str
    spec: ModelSpec
    run: Callable[[np.ndarray], dict[str, np.ndarray]]
    providers: list[str] | None = None


def onnx_session(path: str | Path, *, device: str = "cpu", threads: int | None = None, memory_arena: bool = True,
                 spinning: bool = True, data: bytes | None = None):
    """An onnxruntime session for the model at `path` (or for its bytes `data`, e.g. a graph
    with extra outputs; `path` then names it in messages), on CUDA when asked and available.

    `memory_arena=False` makes every run allocate (and free) its own memory, so the bench
    can see a run's peak; the default arena keeps it between runs. `spinning=False` keeps
    idle worker threads from busy-waiting, for sessions that share the process with torch."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise AgecliError("onnxruntime is needed to run ONNX models: pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = memory_arena
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path) if data is None else data, options, providers=providers)
    except Exception as exc:
        raise AgecliError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None


def load_exported(path: str | Path, *, device: str = "cpu", threads: int | None = None,
                  kind: str | None = None) -> Exported:
    """Load an ONNX or TorchScript file written by `export` (its spec comes from its metadata);
    `kind` ("onnx" | "torchscript") when the file name does not tell."""
    path = Path(path)
    if not path.exists():
        raise AgecliError(f"model file {path} does not exist.")
    if kind == "onnx" or (kind is None and (path.suffix.lower() == ".onnx" or sniff(path) == "an ONNX model")):
        session = onnx_session(path, device=device, threads=threads)
        meta = session.get_modelmeta().custom_metadata_map
        if "agecli_spec" not in meta:
            raise AgecliError(f"{path} is an ONNX model but not one exported by `agecli export` (no agecli_spec "
                              "metadata); use it as a teacher with `agecli distill --teacher` instead.")
        spec = ModelSpec.from_dict(json.loads(meta["agecli_spec"]))
        names = [o.name for o in session.get_outputs()]

        def run(x01: np.ndarray) -> dict[str, np.ndarray]:
            return dict(zip(names, session.run(names, {"images": np.ascontiguousarray(x01, dtype=np.float32)})))

        return Exported(path, "onnx", spec, run, session.get_providers())
    extra = {"agecli_spec.json": ""}
    try:
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:
        raise AgecliError(f"{path} is neither an agecli ONNX nor TorchScript export "
                          f"({str(exc).splitlines()[0][:120]}).") from None
    if not extra["agecli_spec.json"]:
        raise AgecliError(f"{path} is a TorchScript module without agecli metadata; export it with `agecli export`.")
    spec = ModelSpec.from_dict(json.loads(extra["agecli_spec.json"]))
    names = output_names(spec)

    @torch.inference_mode()
    def run_ts(x01: np.ndarray) -> dict[str, np.ndarray]:
        outs = module(torch.from_numpy(np.ascontiguousarray(x01, dtype=np.float32)).to(device))
        return {n: o.float().cpu().numpy() for n, o in zip(names, outs)}

    return Exported(path, "torchscript", spec, run_ts)


# --------------------------------------------------------------------------- parity faces
def parity_faces(model_path: Path, spec: ModelSpec, run: str | Path | None, limit: int = 256,
                 splits: tuple[str, ...] = ("test", "val", "all")):
    """Real aligned faces (uint8) and their ages for a parity check, from the run's store: the
    first of `splits` that has faces (int8 calibration asks for val first: never tune on test)."""
    from agecli.store import FaceStore

    candidates: list[Path] = []
    if run is not None:   # a folder without prepared faces falls back (and the parity line says where)
        if not Path(run).exists():   # but a path that is not there at all is a mistake, not a choice
            raise AgecliError(f"--run {run} does not exist; give a run that `agecli prepare` made, or leave --run "
                              "out to check on the model's own run or the bundled photos.")
        candidates.append(Path(run))
    provenance_run = spec.provenance.get("run") if isinstance(spec.provenance, dict) else None
    if provenance_run:
        candidates.append(Path(provenance_run))
    for parent in model_path.resolve().parents[:4]:
        if (parent / "prepare" / "manifest.json").exists():
            candidates.append(parent)
    for candidate in candidates:
        if (candidate / "prepare" / "manifest.json").exists():
            store = FaceStore.open(candidate)
            for split in splits:
                idx = store.indices(split)
                if len(idx):
                    break
            idx = idx[np.linspace(0, len(idx) - 1, min(limit, len(idx))).astype(int)]
            return (np.ascontiguousarray(store.images[np.sort(idx)]),
                    store.records["age"].to_numpy(dtype=float)[np.sort(idx)], str(candidate), split)
    return _bundled_faces(model_path, spec, candidates, limit)


def _bundled_faces(model_path: Path, spec: ModelSpec, looked: list[Path], limit: int):
    """Without a prepared run: the faces of the photos bundled with agecli, cut as predict cuts them."""
    from agecli.stages.facecrop import SAMPLE_PHOTOS, photo_faces

    photos = sorted(SAMPLE_PHOTOS.glob("*.jpg"))
    try:
        faces = photo_faces(spec, photos, limit=limit) if photos else None
    except AgecliError:  # no face detector installed
        faces = None
    if faces is None or not len(faces):
        raise AgecliError(f"no prepared run found for the parity check of {model_path} (looked in "
                          f"{', '.join(map(str, looked)) or 'the folders above the model'}) and no bundled photo "
                          "could stand in; pass --run RUN with a prepare stage whose faces are aligned as the "
                          "model expects.")
    return faces, np.full(len(faces), np.nan), str(SAMPLE_PHOTOS), "bundled photos"


def to_unit(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, S, S, 3) -> float32 (N, 3, size, size) in [0, 1], resized as training does."""
    return batches.to_unit(torch.from_numpy(np.ascontiguousarray(images)), size).numpy()


def _mae(pred: np.ndarray, true: np.ndarray) -> float | None:
    keep = ~np.isnan(true)
    return float(np.abs(pred[keep] - true[keep]).mean()) if keep.any() else None


# --------------------------------------------------------------------------- export
def export(model_path: str | Path, format: str = "onnx", out: str | Path | None = None, *,
           quantize: str | None = None, run: str | Path | None = None, tolerance: float = PARITY_TOLERANCE,
           parity_limit: int = 256, force: bool = False, progress=None) -> dict[str, Any]:
    """Export a checkpoint (a path, or `default`), check it against PyTorch on real faces before
    it is put in place, optionally quantise (ONNX int8). `force` allows replacing an existing --out."""
    model_path = resolve_checkpoint(model_path)
    fmt = get_format(format)
    if quantize not in (None, "int8"):
        raise AgecliError(f"--quantize {quantize!r} is not supported; the only choice is int8.")
    if quantize and not fmt.quantize:
        raise AgecliError(f"--quantize int8 needs --format onnx (onnxruntime static quantisation); got {format}.")
    read_checkpoint(model_path)  # explains what the file is when it is not a checkpoint
    model, spec = load_checkpoint(model_path, "cpu")
    out = export_target(model_path, out, fmt, force)
    if quantize:
        check_target(quantized_path(out), model_path, force, "the int8 copy")
    wrapper = DeployWrapper(model, spec).eval()
    metadata = export_metadata(model_path, spec)
    if progress:
        progress("export", 0, 2)
    faces, ages, store_run, split = parity_faces(model_path, spec, run, parity_limit)
    x01 = to_unit(faces, spec.input_size)
    with atomic_path(out) as tmp:  # checked before the rename: a failed check leaves --out as it was
        fmt.write(wrapper, spec, tmp, metadata)
        if progress:
            progress("export", 1, 2)
        got = load_exported(tmp, kind=fmt.name).run(x01)
        parity = {"faces": int(len(faces)), "run": store_run, "split": split,
                  **_parity(wrapper, x01, got, ages, spec, tolerance)}
        if not parity["passed"]:
            raise AgecliError(
                f"the {fmt.name} export of {model_path} differs from PyTorch by up to {parity['max_abs_age']:.2e} "
                f"years on {len(faces)} real faces (tolerance {tolerance}); nothing was written to {out}. This "
                "usually means an operator the exporter does not translate faithfully; try --format torchscript.")
    if progress:
        progress("export", 2, 2)
    result: dict[str, Any] = {
        "model": str(model_path), "format": fmt.name, "path": str(out), "bytes": out.stat().st_size,
        "checkpoint_bytes": model_path.stat().st_size, "input_size": spec.input_size,
        "outputs": output_names(spec), "parity": parity,
    }
    if quantize:
        calibration, _, _, calibration_split = parity_faces(model_path, spec, run, CALIBRATION_FACES,
                                                            splits=("val", "train", "all", "test"))
        result["quantized"] = _quantize(out, to_unit(calibration, spec.input_size), x01, ages, got, metadata)
        result["quantized"]["calibration"] = {"faces": int(len(calibration)), "split": calibration_split}
    target = result.get("quantized", {}).get("path", str(out))
    result["next"] = f"agecli predict --model {target} PHOTO_OR_FOLDER --annotate annotated/"
    return result


def export_target(model_path: Path, out: str | Path | None, fmt: ExportFormat, force: bool) -> Path:
    """Where the export goes: --out, else beside the checkpoint (in the current folder for the
    model shipped inside agecli); refused when it would replace the checkpoint or, without
    `force`, an existing file."""
    if out is None:
        shipped = model_path.resolve().parent == WEIGHTS_DIR.resolve()
        out = Path(model_path.stem + fmt.suffix) if shipped else model_path.with_suffix(fmt.suffix)
    out = Path(out)
    check_target(out, model_path, force, "--out")
    return out


def check_target(path: Path, model_path: Path, force: bool, what: str) -> None:
    if path.exists() and path.resolve() == model_path.resolve():
        raise AgecliError(f"{what} {path} is the checkpoint being exported; an export never replaces its model. "
                          "Give another --out.")
    if path.is_dir():
        raise AgecliError(f"{what} {path} is a folder; give a file name, e.g. --out {path / ('model' + path.suffix)}.")
    if path.exists() and not force:
        raise AgecliError(f"{what} {path} exists; agecli does not write over it unless asked: add --force to "
                          "replace it, or give another --out.")
    check_writable(path, what)


def quantized_path(path: Path) -> Path:
    return path.with_name(path.stem + ".int8.onnx")


def export_metadata(model_path: Path, spec: ModelSpec) -> dict[str, str]:
    """What an exported file says about itself: the full spec, its source, its inputs and outputs,
    and (`agecli_inference`) how to feed and read it, in numbers."""
    return {
        "agecli_spec": json.dumps(spec.to_dict(), default=str),
        "agecli_format": EXPORT_FORMAT,
        "agecli_inference": json.dumps(inference_metadata(spec)),
        "source_checkpoint": str(model_path),
        "source_sha256": fingerprint_file(model_path),
        "inputs": f"images: float32 (N, 3, {spec.input_size}, {spec.input_size}) RGB in [0, 1], "
                  "faces cut out as agecli_inference.crop says",
        "outputs": ", ".join(output_names(spec)),
    }


def inference_metadata(spec: ModelSpec) -> dict[str, Any]:
    """How to use the exported graph without agecli: the input, the face crop and each output."""
    from agecli.stages.facecrop import crop_recipe

    size = int(spec.input_size)
    return {
        "input": {"name": "images", "shape": ["N", 3, size, size], "dtype": "float32", "layout": "NCHW",
                  "input_size": size, "channel_order": "RGB", "value_range": [0.0, 1.0], "pixel_scale": 1 / 255,
                  "mean": [float(v) for v in spec.mean], "std": [float(v) for v in spec.std],
                  "normalisation": "inside the graph: feed pixel / 255; the graph computes (x - mean) / std"},
        "crop": crop_recipe(spec),
        "outputs": output_decoding(spec),
    }


def output_decoding(spec: ModelSpec) -> dict[str, Any]:
    """Each output of the graph and how `age_raw` decodes (so a user can get the distribution too)."""
    from agecli.labels import group_midpoint

    encoding = spec.build_encoding()
    k = int(encoding.num_outputs)
    raw: dict[str, Any] = {"shape": ["N", k], "encoding": encoding.name}
    if encoding.name == "regression":
        zero, one = (float(v) for v in encoding.predict(torch.tensor([[0.0], [1.0]])))
        raw.update(kind="standardised age", decode="linear", scale=one - zero, offset=zero,
                   formula="age = age_raw[:, 0] * scale + offset")
    elif encoding.name == "ordinal":
        raw.update(kind="ordinal logits", decode="ordinal_sum", support=list(range(k + 1)),
                   formula="P(age > j) = sigmoid(age_raw[:, j]); age = sum_j P(age > j); "
                           "p(age = a) = P(age > a - 1) - P(age > a) over support")
    elif encoding.support == "groups":
        raw.update(kind="logits", decode="argmax_group", support=[group_midpoint(g) for g in range(k)],
                   formula="age = support[argmax(age_raw)] (group midpoints)")
    else:
        argmax = getattr(encoding, "decode", "expected") == "argmax"
        raw.update(kind="logits", decode="softmax_argmax" if argmax else "softmax_expected",
                   support=list(range(k)),
                   formula="p = softmax(age_raw, axis=1); age = sum(p * support) (the expected value"
                           + (", reported as argmax(p))" if argmax else ")")
                           + "; age_std = sqrt(sum(p * (support - age)^2))")
    outputs: dict[str, Any] = {"age": {"shape": ["N"], "unit": "years", "meaning": "the decoded age of age_raw"}}
    if spec.gender:
        outputs["female_prob"] = {"shape": ["N"], "meaning": "P(female): softmax of the gender head's two logits "
                                  "(index 0 male, index 1 female), taken at index 1", "female_index": 1,
                                  "gender": "female when female_prob >= 0.5, else male"}
    outputs["age_raw"] = raw
    return outputs


def _parity(wrapper: nn.Module, x01: np.ndarray, got: dict[str, np.ndarray], ages: np.ndarray, spec: ModelSpec,
            tolerance: float) -> dict[str, Any]:
    """The export's outputs `got` against PyTorch's on the same faces; `passed` within `tolerance` years."""
    with torch.inference_mode():
        torch_out = [o.numpy() for o in wrapper(torch.from_numpy(x01))]
    age_t, age_e = torch_out[0], got["age"]
    parity = {
        "max_abs_age": float(np.abs(age_e - age_t).max()),
        "max_abs_raw": float(np.abs(got["age_raw"] - torch_out[-1]).max()),
        "mae_torch": _mae(age_t, ages), "mae_export": _mae(age_e, ages),
        "tolerance": tolerance,
    }
    if spec.gender:
        parity["max_abs_female_prob"] = float(np.abs(got["female_prob"] - torch_out[1]).max())
    parity["mae_diff"] = (None if parity["mae_torch"] is None
                          else abs(parity["mae_export"] - parity["mae_torch"]))
    parity["passed"] = parity["max_abs_age"] <= tolerance
    return parity


def _median_ms(fn: Callable[[], Any], repeats: int = 20) -> float:
    """Median milliseconds per call on the CPU, after 3 untimed calls."""
    return time_call(fn, warmup=3, repeats=repeats)["median_ms"]


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantiser gives its advice through the root logger: keep it out of the
    output while it runs, and leave the caller's logging level as it was."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize(path: Path, calibration: np.ndarray, x01: np.ndarray, ages: np.ndarray, fp32: dict[str, np.ndarray],
              metadata: dict[str, str]) -> dict[str, Any]:
    """An int8 copy of the ONNX file at `path`: weights per channel, activations with scales
    fixed on `calibration` faces (static, QDQ). Dynamic quantisation would be simpler, but
    ONNX Runtime runs its int8 convolutions several times slower than float ones."""
    try:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise AgecliError(f"int8 quantisation needs onnxruntime.quantization and the `onnx` package "
                          f"({exc}); install it with `pip install onnx`.") from None

    class Faces(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": np.ascontiguousarray(calibration[i:i + 16], dtype=np.float32)}
                                 for i in range(0, len(calibration), 16)])

        def get_next(self):
            return next(self.batches, None)

    qpath = quantized_path(path)
    with _quiet_root_logger(), atomic_path(qpath) as tmp, tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"  # shapes inferred and the graph folded first
        quant_pre_process(str(path), str(prepared))
        quantize_static(str(prepared), str(tmp), Faces(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        # the quantiser rewrites the model: re-attach the metadata when it was dropped
        from onnxruntime import InferenceSession

        if "agecli_spec" not in InferenceSession(str(tmp), providers=["CPUExecutionProvider"]
                                                 ).get_modelmeta().custom_metadata_map:
            add_onnx_metadata(tmp, {**metadata, "quantized": "int8 static (QDQ), calibrated"})
    q = load_exported(qpath)
    f = load_exported(path)
    got = q.run(x01)
    one = x01[:1]
    batch = x01[:32]
    ms_fp32, ms_int8 = _median_ms(lambda: f.run(one)), _median_ms(lambda: q.run(one))
    bt_fp32, bt_int8 = _median_ms(lambda: f.run(batch), 5), _median_ms(lambda: q.run(batch), 5)
    mae_fp32, mae_int8 = _mae(fp32["age"], ages), _mae(got["age"], ages)
    return {
        "path": str(qpath), "bytes": qpath.stat().st_size, "fp32_bytes": path.stat().st_size,
        "max_abs_age_vs_fp32": float(np.abs(got["age"] - fp32["age"]).max()),
        "mae_fp32": mae_fp32, "mae_int8": mae_int8,
        "mae_cost": None if mae_fp32 is None else mae_int8 - mae_fp32,
        "latency_ms_fp32": ms_fp32, "latency_ms_int8": ms_int8, "speedup_batch1": ms_fp32 / ms_int8,
        "batch": int(len(batch)), "batch_ms_fp32": bt_fp32, "batch_ms_int8": bt_int8,
        "speedup_batch": bt_fp32 / bt_int8, "threads": torch.get_num_threads(),
    }
