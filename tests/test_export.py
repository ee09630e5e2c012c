"""agecli export: ONNX / TorchScript files that match PyTorch on real faces and describe themselves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agecli.errors import AgecliError
from agecli.modeling.checkpoint import load_checkpoint, save_checkpoint
from agecli.stages.export import export, load_exported, to_unit


@pytest.fixture(scope="module")
def onnx_export(bench_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "teacher.onnx"
    return export(bench_run / "train" / "mobilenet_v3_small" / "best.pt", "onnx", out=out)


def test_onnx_parity_on_real_faces(onnx_export, bench_run):
    p = onnx_export["parity"]
    assert p["passed"] and p["split"] == "test" and p["faces"] > 10
    assert p["max_abs_age"] < 0.01 and p["mae_diff"] < 0.01
    assert onnx_export["outputs"] == ["age", "female_prob", "age_raw"]
    assert onnx_export["next"].startswith("agecli predict --model")


def test_onnx_metadata_and_dynamic_batch(onnx_export, bench_run):
    import onnxruntime as ort

    from agecli.store import FaceStore

    session = ort.InferenceSession(onnx_export["path"], providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    spec = json.loads(meta["agecli_spec"])
    assert spec["arch"] == "mobilenet_v3_small" and spec["input_size"] == 48 and spec["gender"] is True
    assert meta["agecli_format"] == "agecli.export"

    store = FaceStore.open(bench_run)
    faces = store.images[store.indices("test")[:5]]
    exported = load_exported(onnx_export["path"])
    model, ck_spec = load_checkpoint(bench_run / "train" / "mobilenet_v3_small" / "best.pt")
    x = to_unit(faces, 48)
    five = exported.run(x)["age"]
    one = np.concatenate([exported.run(x[i:i + 1])["age"] for i in range(5)])
    assert five.shape == (5,) and np.allclose(five, one, atol=1e-4)
    from agecli.data.batches import to_input

    with torch.inference_mode():
        ref = ck_spec.build_encoding().predict(model(to_input(torch.from_numpy(faces), 48, ck_spec.mean,
                                                              ck_spec.std))["age"]).numpy()
    assert np.allclose(five, ref, atol=1e-3)


def test_torchscript_export_roundtrip(bench_run, tmp_path):
    result = export(bench_run / "distill" / "shufflenet" / "best.pt", "torchscript",
                    out=tmp_path / "student.torchscript")
    assert result["parity"]["passed"] and result["parity"]["max_abs_age"] < 1e-3
    loaded = load_exported(tmp_path / "student.torchscript")
    assert loaded.spec.arch == "shufflenet_v2_x1_0" and loaded.format == "torchscript"


def test_exports_load_by_content_whatever_their_name(tmp_path):
    """`agecli export --format torchscript --out student.pt` printed a next command that failed
    ('damaged or not a PyTorch save'), and UP.ONNX was read as text; a folder or an empty file
    as --model raised IsADirectoryError or was called a text file."""
    import shutil

    from agecli.stages.estimator import load_predictor

    script = export("default", "torchscript", out=tmp_path / "student.pt")["path"]
    onnx_copy = tmp_path / "UP.ONNX"
    shutil.copy(export("default", "onnx", out=tmp_path / "m.onnx")["path"], onnx_copy)
    faces = (np.random.default_rng(0).random((2, 3, 92, 92)) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    reference = load_predictor("default")(faces).age
    for path in (script, onnx_copy):
        assert np.allclose(load_predictor(path)(faces).age, reference, atol=0.01), path
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path, kind in ((empty, "an empty file"), (tmp_path, "a folder")):
        with pytest.raises(AgecliError, match=f"is not an agecli checkpoint: it looks like {kind}\\.$"):
            load_predictor(path)


def test_a_run_given_for_the_parity_check_must_exist(tmp_path):
    """--run /nowhere (a typo) was ignored: the check ran on the bundled photos without a word."""
    with pytest.raises(AgecliError, match=r"--run .*nowhere does not exist"):
        export("default", "onnx", out=tmp_path / "m.onnx", run=tmp_path / "nowhere")
    assert not (tmp_path / "m.onnx").exists()
    assert export("default", "ONNX", out=tmp_path / "m.onnx")["format"] == "onnx"   # names are case-blind


def test_an_int8_copy_without_labelled_faces_says_how_far_its_ages_move(tmp_path):
    """The bundled photos carry no labels, so there is no MAE cost: the output said nothing of
    accuracy at all, though ages moved by up to 2.8 years."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "agecli", "export", "--model", "default", "--quantize", "int8",
                           "--out", str(tmp_path / "q.onnx")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stderr.splitlines() if line.startswith("int8:"))
    assert "ages move by up to" in line and "give --run" in line


def test_int8_quantisation_reports_cost_and_speed(bench_run, tmp_path):
    import logging

    logging.getLogger().setLevel(logging.INFO)  # a caller's own level survives the quantiser's quieting
    result = export(bench_run / "distill" / "shufflenet" / "best.pt", "onnx", out=tmp_path / "s.onnx",
                    quantize="int8")
    assert logging.getLogger().level == logging.INFO
    logging.getLogger().setLevel(logging.WARNING)
    q = result["quantized"]
    assert q["bytes"] < q["fp32_bytes"]  # int8 weights
    assert abs(q["mae_cost"]) < 2.0 and q["latency_ms_int8"] > 0 and q["speedup_batch1"] > 0
    assert load_exported(q["path"]).spec.arch == "shufflenet_v2_x1_0"
    # static: activation scales fixed on val faces (never the test faces of the parity check)
    assert q["calibration"]["split"] == "val" and result["parity"]["split"] == "test"
    import onnx

    ops = {node.op_type for node in onnx.load(q["path"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "ConvInteger" not in ops
    assert result["next"].endswith("annotated/") and ".int8.onnx" in result["next"]


def test_bad_inputs_are_explained(bench_run, tmp_path):
    onnx_file = tmp_path / "other.onnx"
    onnx_file.write_bytes(b"\x08\x07\x12\x04onnx" + b"\x00" * 64)
    with pytest.raises(AgecliError, match="not an agecli checkpoint.*ONNX"):
        export(onnx_file)
    state = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, state)
    with pytest.raises(AgecliError, match="plain state dict"):
        export(state)
    with pytest.raises(AgecliError, match="unknown export format"):
        export(bench_run / "train" / "mobilenet_v3_small" / "best.pt", "tflite")
    with pytest.raises(AgecliError, match="needs --format onnx"):
        export(bench_run / "train" / "mobilenet_v3_small" / "best.pt", "torchscript", quantize="int8")


# --------------------------------------------------------------------------- the homes export reads through
def test_store_images_become_nchw_unit_tensors_in_one_place():
    from agecli.data.batches import to_nchw_unit, to_unit as to_unit_tensor

    images = torch.randint(0, 256, (2, 6, 6, 3), dtype=torch.uint8)
    x = to_nchw_unit(images)
    assert x.shape == (2, 3, 6, 6) and x.dtype == torch.float32
    assert torch.equal(x[1, 2], images[1, :, :, 2].float() / 255)
    # export's numpy copy, at the stored size, is the very same tensor
    assert np.array_equal(to_unit(images.numpy(), 6), x.numpy()) and torch.equal(to_unit_tensor(images, 6), x)


def test_decode_reads_age_and_female_probability():
    from agecli.modeling.decode import decode, female_probability
    from agecli.modeling.encodings import build_encoding

    enc = build_encoding("ldae")
    logits = torch.randn(3, enc.num_outputs)
    age, female = decode({"age": logits, "gender": torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])}, enc)
    assert torch.equal(age, enc.predict(logits).float())
    assert female[0] == 0.5 and female[1] < 0.5 < female[2]
    assert female_probability({"age": logits}) is None and decode({"age": logits}, enc)[1] is None


# --------------------------------------------------------------------------- the shipped model, files kept safe
def _shipped_copy(tmp_path, provenance: dict | None = None):
    """The default model saved again at `tmp_path/model.pt` (with `provenance` replaced when given)."""
    from agecli.modeling.zoo import default_model_path

    model, spec = load_checkpoint(default_model_path())
    if provenance is not None:
        spec.provenance = provenance
    return save_checkpoint(tmp_path / "model.pt", model, spec)


def test_export_never_replaces_the_model_or_an_existing_file(tmp_path):
    pytest.importorskip("facenet_pytorch", reason="MTCNN (facenet-pytorch) not installed")
    model = _shipped_copy(tmp_path, provenance={})  # no run to read faces from: the bundled photos stand in
    checkpoint = model.read_bytes()
    with pytest.raises(AgecliError, match="is the checkpoint being exported"):
        export(model, "onnx", out=model)
    assert model.read_bytes() == checkpoint
    out = tmp_path / "mine.onnx"
    out.write_bytes(b"the user's own file")
    with pytest.raises(AgecliError, match="exists; agecli does not write over it.*--force"):
        export(model, "onnx", out=out)
    with pytest.raises(AgecliError, match="mine.onnx is a file, not a folder; choose another place"):
        export(model, "onnx", out=out / "model.onnx")  # refused before the export, not at its end
    with pytest.raises(AgecliError, match="differs from PyTorch.*nothing was written"):
        export(model, "onnx", out=out, force=True, tolerance=0.0)  # a parity check that must fail
    assert out.read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.onnx", "model.pt"]  # no temporary file left
    result = export(model, "onnx", out=out, force=True)
    assert result["parity"]["passed"] and result["parity"]["split"] == "bundled photos"
    assert result["parity"]["faces"] >= 20 and result["parity"]["mae_torch"] is None  # photos have no labels
    assert load_exported(out).spec.arch == load_checkpoint(model)[1].arch


def test_the_shipped_model_exports_into_the_current_folder(tmp_path, monkeypatch):
    pytest.importorskip("facenet_pytorch", reason="MTCNN (facenet-pytorch) not installed")
    from agecli.modeling.zoo import WEIGHTS_DIR

    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in WEIGHTS_DIR.iterdir())
    result = export("default", "torchscript")
    assert result["path"] == "default.torchscript" and (tmp_path / "default.torchscript").exists()
    assert sorted(p.name for p in WEIGHTS_DIR.iterdir()) == before  # nothing written inside the package
    with pytest.raises(AgecliError, match="not an agecli checkpoint.*bench --models dlib-age"):
        export("dlib-age")


def test_inference_metadata_says_everything_in_numbers(tmp_path):
    pytest.importorskip("facenet_pytorch", reason="MTCNN (facenet-pytorch) not installed")
    import onnxruntime as ort

    from agecli.data.faces import template_pixels
    from agecli.stages.facecrop import crop_alignment

    model = _shipped_copy(tmp_path)
    export(model, "onnx", out=tmp_path / "m.onnx", run=tmp_path)  # --run without a prepare stage: model's run
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    info = json.loads(session.get_modelmeta().custom_metadata_map["agecli_inference"])
    spec = load_exported(tmp_path / "m.onnx").spec
    assert info["input"]["input_size"] == spec.input_size and info["input"]["channel_order"] == "RGB"
    assert info["input"]["mean"] == list(spec.mean) and info["input"]["std"] == list(spec.std)
    alignment, _ = crop_alignment(spec)
    assert info["crop"]["crop_size"] == 150 and info["crop"]["margin"] == 0.0
    assert np.allclose(info["crop"]["template_px"], template_pixels(alignment), atol=1e-3)
    raw = info["outputs"]["age_raw"]
    assert raw["decode"] == "softmax_expected" and raw["support"] == list(range(101))
    assert info["outputs"]["female_prob"]["female_index"] == 1
    # decoding age_raw as the metadata says gives the graph's own age output
    x = np.random.default_rng(0).random((4, 3, spec.input_size, spec.input_size), dtype=np.float32)
    age, female, logits = session.run(["age", "female_prob", "age_raw"], {"images": x})
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.allclose(p @ np.asarray(raw["support"]), age, atol=1e-3) and ((0 <= female) & (female <= 1)).all()


def test_dlib_residual_padding_exports_as_constants(tmp_path):
    """dlib's zero-padded residual adds become Pads by fixed amounts, not Shape arithmetic
    that ONNX Runtime would run at every call (the batch is the only dynamic axis)."""
    pytest.importorskip("facenet_pytorch", reason="MTCNN (facenet-pytorch) not installed")
    onnx = pytest.importorskip("onnx")

    model = _shipped_copy(tmp_path)
    result = export(model, "onnx", out=tmp_path / "m.onnx", run=tmp_path)
    ops = [node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert result["parity"]["passed"]
    assert "Pad" in ops and "Shape" not in ops, sorted(set(ops))
