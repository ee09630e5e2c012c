"""Backbone registry and the age model built on it.

`build_model(arch, encoding, gender=...)` returns an `AgeModel`: a torchvision backbone
with its classifier removed, followed by the encoding's age head and an optional gender
head. `forward` returns a dict {"age": outputs, "features": pooled features, ["gender"]},
so distillation can reach the features and export can pick what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from agecli.modeling.dlib_resnet import (DLIB_MEAN, DLIB_STD, IDENTITY_BLOCKS, DlibResNet10, init_age_head_from_dlib,
                          load_dlib_weights)
from agecli.modeling.dlib_facerec import FACEREC_MEAN, FACEREC_STD, DlibFaceRec, fold_affine, load_facerec_weights
from agecli.modeling.encodings import Encoding
from agecli.errors import AgecliError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    name: str
    default_size: int
    family: str  # teacher-sized or student-sized, for `agecli models`
    strip: Callable[[nn.Module], tuple[nn.Module, int]] | None = None  # torchvision: drop the classifier
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalisation its pretrained weights expect
    std: tuple[float, float, float] = IMAGENET_STD
    pretrained: tuple[str, ...] = ("imagenet",)  # weight sets `--pretrained` accepts
    min_size: int = 16  # the smallest input side its unpadded strided layers leave something of


def _strip_attr(attr: str) -> Callable[[nn.Module], tuple[nn.Module, int]]:
    """Replace `model.<attr>` (a Linear, or a Sequential ending in one) by an identity."""

    def strip(model: nn.Module) -> tuple[nn.Module, int]:
        head = getattr(model, attr)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return model, head.in_features
        linear_at = max(i for i, layer in enumerate(head) if isinstance(layer, nn.Linear))
        dim = head[linear_at].in_features
        head[linear_at] = nn.Identity()
        return model, dim

    return strip


def _strip_vgg(model: nn.Module) -> tuple[nn.Module, int]:
    # keep fc6/fc7 (pretrained), drop the 1000-way layer; the adaptive pool lets any input size through
    model.classifier[-1] = nn.Identity()
    return model, 4096


def _strip_squeezenet(model: nn.Module) -> tuple[nn.Module, int]:
    # SqueezeNet classifies with a 1x1 conv; replace it with global pooling of the 512 features
    model.classifier = nn.Sequential(nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return model, 512


BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("resnet18", 224, "teacher", _strip_attr("fc")),
    Backbone("resnet34", 224, "teacher", _strip_attr("fc")),
    Backbone("resnet50", 224, "teacher", _strip_attr("fc")),
    Backbone("vgg16", 224, "teacher", _strip_vgg),
    Backbone("mobilenet_v2", 224, "student", _strip_attr("classifier")),
    Backbone("mobilenet_v3_small", 224, "student", _strip_attr("classifier")),
    Backbone("mobilenet_v3_large", 224, "student", _strip_attr("classifier")),
    Backbone("shufflenet_v2_x1_0", 224, "student", _strip_attr("fc")),
    Backbone("efficientnet_b0", 224, "student", _strip_attr("classifier")),
    Backbone("squeezenet1_1", 224, "student", _strip_squeezenet),
    # the CC0 dlib age model (ResNet-10 trained on ~110k faces), fine-tunable; see dlib_resnet.py
    Backbone("dlib_resnet10", 64, "teacher", None, DLIB_MEAN, DLIB_STD, ("dlib",)),
    # the same without its three identity blocks: a pretrained student (see DlibResNet10)
    Backbone("dlib_resnet6", 56, "student", None, DLIB_MEAN, DLIB_STD, ("dlib",)),
    # dlib's CC0 face-recognition ResNet (3 M faces of 7,485 people), fine-tunable; see dlib_facerec.py
    Backbone("dlib_facerec", 150, "teacher", None, FACEREC_MEAN, FACEREC_STD, ("dlib",), 103),
    # its first three stages (widths 32-128, 1.15 M parameters): a student that keeps face-recognition features
    Backbone("dlib_facerec3", 112, "student", None, FACEREC_MEAN, FACEREC_STD, ("dlib",), 31),
    # the same plus the fourth stage's first block (256 wide, 2.06 M): deeper features for about 3% more time
    Backbone("dlib_facerec3_plus", 112, "student", None, FACEREC_MEAN, FACEREC_STD, ("dlib",), 55),
    # three stages with fewer blocks: 1, 2, 2 (0.68 M, about half the time) and 1, 1, 1 (0.31 M, a third)
    Backbone("dlib_facerec3_slim", 112, "student", None, FACEREC_MEAN, FACEREC_STD, ("dlib",), 31),
    Backbone("dlib_facerec3_tiny", 112, "student", None, FACEREC_MEAN, FACEREC_STD, ("dlib",), 31),
    # the slim cut with each block's first conv narrowed to 3/4 and 1/2 of its width (the
    # file's strongest filters kept): 0.52 M / 0.35 M, about 15% / 35% less time than the slim cut
    Backbone("dlib_facerec3_slim75", 112, "student", None, FACEREC_MEAN, FACEREC_STD, ("dlib",), 31),
    Backbone("dlib_facerec3_slim50", 112, "student", None, FACEREC_MEAN, FACEREC_STD, ("dlib",), 31),
)}

# dlib variants: which identity blocks each leaves out
_DLIB_DROP = {"dlib_resnet10": (), "dlib_resnet6": IDENTITY_BLOCKS}
# face-recognition variants: how many leading blocks of each width stage each keeps
_FACEREC_DEPTHS = {"dlib_facerec": (3, 4, 3, 4), "dlib_facerec3": (3, 4, 3), "dlib_facerec3_plus": (3, 4, 3, 1),
                   "dlib_facerec3_slim": (1, 2, 2), "dlib_facerec3_tiny": (1, 1, 1),
                   "dlib_facerec3_slim75": (1, 2, 2), "dlib_facerec3_slim50": (1, 2, 2)}
# ... and which fraction of each block's width its first conv keeps (1 where not named)
_FACEREC_INNER = {"dlib_facerec3_slim75": 0.75, "dlib_facerec3_slim50": 0.5}

ALIASES = {
    "mobilenet": "mobilenet_v3_small",
    "mobilenetv3": "mobilenet_v3_small",
    "mobilenetv2": "mobilenet_v2",
    "shufflenet": "shufflenet_v2_x1_0",
    "efficientnet": "efficientnet_b0",
    "squeezenet": "squeezenet1_1",
    "resnet": "resnet50",
    "vgg": "vgg16",
    "dlib": "dlib_resnet10",
    "facerec": "dlib_facerec",
}


def resolve_arch(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in BACKBONES:
        import difflib

        close = difflib.get_close_matches(key, [*BACKBONES, *ALIASES], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise AgecliError(
            f"unknown architecture {name!r}.{hint} Valid: {', '.join(BACKBONES)} "
            f"(aliases: {', '.join(f'{a}={t}' for a, t in ALIASES.items())}). See `agecli models`.")
    return key


class AgeModel(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, encoding: Encoding, gender: bool):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.age_head = encoding.make_head(feature_dim)
        self.gender_head = nn.Linear(feature_dim, 2) if gender else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        out = {"age": self.age_head(features), "features": features}
        if self.gender_head is not None:
            out["gender"] = self.gender_head(features)
        return out


def build_model(arch: str, encoding: Encoding, *, gender: bool = False,
                pretrained: str | None = None) -> AgeModel:
    """Build an age model. `pretrained`: None (from scratch), "imagenet" (torchvision's
    default weights) or "dlib" (dlib's CC0 weights: the age model for the dlib_resnet*
    backbones, the face-recognition network for the dlib_facerec* ones)."""
    import torchvision

    arch = resolve_arch(arch)
    spec = BACKBONES[arch]
    if pretrained in ("none", "scratch"):
        pretrained = None
    if pretrained is not None and pretrained not in spec.pretrained:
        raise AgecliError(f"--pretrained {pretrained!r} is not available for {arch}; it accepts "
                          f"{', '.join(spec.pretrained)} or none. To start from a file use --init PATH.")
    if arch in _DLIB_DROP:
        backbone = DlibResNet10(drop=_DLIB_DROP[arch])
        model = AgeModel(backbone, backbone.feature_dim, encoding, gender)
        if pretrained == "dlib":
            weight, bias = load_dlib_weights(backbone)
            init_age_head_from_dlib(model.age_head, weight, bias)
        return model
    if arch in _FACEREC_DEPTHS:
        return _facerec_model(_FACEREC_DEPTHS[arch], _FACEREC_INNER.get(arch, 1.0), encoding, gender,
                              pretrained == "dlib")
    weights = None
    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        _ensure_weights_available(arch, weights)
    backbone, dim = spec.strip(torchvision.models.get_model(arch, weights=weights))
    _fast_batchnorm_statistics(backbone)
    return AgeModel(backbone, dim, encoding, gender)


class FaceRecFeatures(nn.Module):
    """dlib's face-recognition network, its affine layers folded into the convs so that it
    fine-tunes (see DlibFaceRec), with its pooled features standardised (BatchNorm1d).

    The pooled features share a large offset and vary little around it (on real faces: mean
    1.16, std 0.17 per dimension), so a freshly initialised age head would barely see their
    differences at first and its early gradients would go into reshaping the backbone;
    standardised, the head reads them at once."""

    def __init__(self, depths: tuple[int, ...], pretrained: bool, inner: float = 1.0):
        super().__init__()
        self.body = DlibFaceRec(depths=depths, folded=True, inner=inner)
        if pretrained:
            fold_affine(load_facerec_weights(DlibFaceRec(depths=depths, inner=inner)), self.body)
        # the 128-D identity embedding is not used for age (the pooled features carry more
        # of it); leaving it out keeps every parameter trained, which DDP requires
        self.body.embedding = None
        self.feature_dim = self.body.feature_dim
        self.norm = nn.BatchNorm1d(self.feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.body(x))


def _facerec_model(depths: tuple[int, ...], inner: float, encoding: Encoding, gender: bool,
                   pretrained: bool) -> AgeModel:
    backbone = FaceRecFeatures(depths, pretrained, inner)
    return AgeModel(backbone, backbone.feature_dim, encoding, gender)


def _fast_batchnorm_statistics(module: nn.Module, momentum: float = 0.1) -> None:
    """torchvision's MobileNetV3 and EfficientNet keep BatchNorm running statistics with
    momentum 0.01, tuned for long ImageNet schedules. On a face dataset of a few thousand
    steps, trained from scratch, those statistics lag far behind the weights and the model
    in eval mode predicts garbage (measured: val MAE 23 -> 12 just by recomputing them).
    PyTorch's default 0.1 tracks them."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.momentum = momentum


def default_normalisation(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) a backbone's pretrained weights expect; ImageNet's for torchvision models."""
    spec = BACKBONES[resolve_arch(arch)]
    return spec.mean, spec.std


def _ensure_weights_available(arch: str, weights: Any) -> None:
    """Torchvision downloads weights on first use; offline, say which file is needed and where."""
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    filename = Path(weights.url).name
    if (hub_dir / filename).exists():
        return
    try:
        import urllib.request

        urllib.request.urlopen(weights.url, timeout=5).close()
    except Exception:
        raise AgecliError(
            f"ImageNet weights for {arch} are not cached and cannot be downloaded here.\n"
            f"Needed file: {filename}\n  from {weights.url}\n  put it at {hub_dir / filename}\n"
            "or train from scratch (--pretrained none), or start from a checkpoint (--init PATH).") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_backbones() -> list[dict[str, Any]]:
    """Rows for `agecli models`: name, aliases, parameters (with a 1-output head), default size."""
    from agecli.modeling.encodings import Regression

    rows = []
    for name, spec in BACKBONES.items():
        model = build_model(name, Regression())
        rows.append({
            "name": name,
            "aliases": [a for a, t in ALIASES.items() if t == name],
            "params_m": round(count_parameters(model) / 1e6, 2),
            "default_size": spec.default_size,
            "family": spec.family,
        })
    return rows
