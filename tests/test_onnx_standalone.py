"""docs/onnx_standalone.py, which uses an exported model with onnxruntime, OpenCV and numpy alone,
reproduces `agecli predict` on the bundled photos."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agecli.stages.facecrop import SAMPLE_PHOTOS

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "onnx_standalone.py"


def test_the_script_imports_no_agecli_and_no_torch():
    tree = ast.parse(SCRIPT.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "argparse", "json", "math", "sys", "cv2", "numpy", "onnxruntime",
                        "facenet_pytorch"}, imported


def test_standalone_script_reproduces_agecli_predict_on_the_bundled_photos(tmp_path):
    pytest.importorskip("facenet_pytorch", reason="MTCNN (facenet-pytorch) not installed")
    from agecli.stages.export import export
    from agecli.stages.predict import predict

    model = export("default", "onnx", out=tmp_path / "default.onnx")["path"]
    photos = sorted(SAMPLE_PHOTOS.glob("*.jpg"))
    proc = subprocess.run([sys.executable, str(SCRIPT), model, *map(str, photos)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    theirs = [json.loads(line) for line in proc.stdout.splitlines()]
    ours = predict(photos)["rows"]  # the checkpoint itself, not the export
    assert len(theirs) == len(ours) >= 20
    for a, b in zip(theirs, ours):
        assert a["file"] == b["file"] and a["face"] == b["face"]
        assert a["box"] == pytest.approx([b[k] for k in ("x1", "y1", "x2", "y2")], abs=0.5)
        assert abs(a["age"] - b["age"]) < 0.1 and abs(a["age_std"] - b["age_std"]) < 0.1
        assert a["gender"] == b["gender"] and abs(a["female_prob"] - b["female_prob"]) < 0.01
