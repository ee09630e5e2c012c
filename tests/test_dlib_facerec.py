"""The PyTorch port of dlib's face-recognition ResNet (agecli/modeling/dlib_facerec.py).

The reader is checked against the real `.dat` file (skips without `face_recognition_models`),
the port against dlib itself on real UTKFace faces (skips without `dlib-bin` or
../shared/data). The rest needs neither.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from agecli.errors import AgecliError
from agecli.modeling import dlib_facerec as fr

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
UTKFACE_DIR = SHARED_DATA / "utkface" / "UTKFace"


def _weights_or_skip() -> Path:
    try:
        return fr.facerec_weights_path()
    except AgecliError:
        pytest.skip("dlib's face-recognition weights are absent (pip install face_recognition_models)")


@pytest.fixture(scope="module")
def net() -> fr.DlibNet:
    return fr.read_dlib_net(_weights_or_skip())


@pytest.fixture(scope="module")
def pretrained() -> fr.DlibFaceRec:
    torch.set_num_threads(1)
    _weights_or_skip()
    return fr.pretrained_facerec()


def _expected_kinds() -> list[str]:
    """dlib's anet_type (examples/dnn_face_recognition_ex.cpp), input side first, written
    out independently of the module: tag/skip layers appear as `tag_or_skip`."""
    kinds = ["con", "affine", "relu", "max_pool"]
    block = ["con", "affine", "relu", "con", "affine"]
    downs = [False] * 3 + [True] + [False] * 3 + [True] + [False] * 2 + [True] + [False] * 2 + [True]
    for down in downs:
        if down:  # residual_down: tag1, block, tag2, skip1, avg_pool, add_prev2, relu
            kinds += ["tag_or_skip", *block, "tag_or_skip", "tag_or_skip", "avg_pool", "add_prev", "relu"]
        else:  # residual: tag1, block, add_prev1, relu
            kinds += ["tag_or_skip", *block, "add_prev", "relu"]
    return kinds + ["avg_pool", "fc"]


def test_reader_finds_the_anet_layer_sequence(net):
    assert net.loss == "loss_metric_2"
    assert net.loss_config == pytest.approx({"margin": 0.04, "distance_threshold": 0.6})
    assert net.input_kind == "input_rgb_image_sized"
    assert net.input_size == (fr.FACEREC_INPUT_SIZE, fr.FACEREC_INPUT_SIZE)
    assert [layer.kind for layer in net.layers] == _expected_kinds()


def test_reader_shapes_strides_and_padding(net):
    convs = [layer for layer in net.layers if layer.kind == "con"]
    shapes = [(c.arrays["weight"].shape, c.config["stride_y"], c.config["padding_y"]) for c in convs]
    assert shapes[0] == ((32, 3, 7, 7), 2, 0)  # stem: 7x7/2, no padding
    down_convs = [s for s in shapes[1:] if s[1] == 2]
    assert down_convs == [((64, 32, 3, 3), 2, 0), ((128, 64, 3, 3), 2, 0), ((256, 128, 3, 3), 2, 0),
                          ((256, 256, 3, 3), 2, 0)]
    assert all(s[0][2:] == (3, 3) and s[2] == 1 for s in shapes[1:] if s[1] == 1)
    assert len(convs) == 29 and all(c.arrays["bias"].shape == (c.config["filters"],) for c in convs)

    affines = [layer for layer in net.layers if layer.kind == "affine"]
    assert [a.config["channels"] for a in affines] == [c.config["filters"] for c in convs]
    assert all(a.config["mode"] == 0 and a.arrays["scale"].shape == a.arrays["offset"].shape for a in affines)

    pools = [layer.config for layer in net.layers if layer.kind in ("max_pool", "avg_pool")]
    assert pools[0] == dict(rows=3, cols=3, stride_y=2, stride_x=2, padding_y=0, padding_x=0)
    assert pools[-1]["rows"] == 0 and pools[-1]["cols"] == 0  # avg_pool_everything
    assert all(p == dict(rows=2, cols=2, stride_y=2, stride_x=2, padding_y=0, padding_x=0) for p in pools[1:-1])

    fc = net.layers[-1]
    assert fc.config == {"outputs": 128, "inputs": 256, "bias": 0}
    assert fc.arrays["weight"].shape == (256, 128) and fc.arrays["weight"].dtype == np.float32


def test_normalisation_constants_match_the_file(net):
    assert tuple(np.float32(fr.FACEREC_PIXEL_MEANS)) == tuple(np.float32(net.input_means))
    pixels = np.arange(256, dtype=np.float64)[:, None]
    ours = (pixels / 255 - np.array(fr.FACEREC_MEAN)) / np.array(fr.FACEREC_STD)
    dlibs = (pixels - np.array(net.input_means)) / 256
    np.testing.assert_allclose(ours, dlibs, atol=1e-6)


def _utkface_chips(n: int) -> np.ndarray:
    """n real faces as 150x150 RGB uint8 chips (the UTKFace crops, resized)."""
    if not UTKFACE_DIR.is_dir():
        pytest.skip(f"real UTKFace faces not found at {UTKFACE_DIR} (../shared/data is absent)")
    from PIL import Image

    files = sorted(UTKFACE_DIR.glob("*.jpg"))[::997][:n]
    size = (fr.FACEREC_INPUT_SIZE, fr.FACEREC_INPUT_SIZE)
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize(size, Image.BILINEAR)) for f in files])


def _to_input(chips: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(fr.FACEREC_MEAN).view(1, 3, 1, 1)) / torch.tensor(fr.FACEREC_STD).view(1, 3, 1, 1)


@pytest.mark.shared_data
def test_embedding_equals_dlibs_descriptor_on_real_faces(pretrained):
    dlib = pytest.importorskip("dlib", reason="dlib-bin (the reference implementation) is not installed")
    chips = _utkface_chips(8)
    reference = dlib.face_recognition_model_v1(str(fr.facerec_weights_path()))
    expected = np.array([np.array(reference.compute_face_descriptor(chip)) for chip in chips])
    with torch.no_grad():
        ours = pretrained.embed(_to_input(chips)).numpy()
    assert np.linalg.norm(expected, axis=1).min() > 0.5  # real descriptors, not zeros
    assert np.abs(ours - expected).max() < 1e-4


def test_add_zero_padded_aligns_top_left():
    small = torch.ones(1, 1, 1, 1)
    large = torch.zeros(1, 2, 2, 2)
    total = fr.add_zero_padded(large, small)
    expected = torch.zeros(1, 2, 2, 2)
    expected[0, 0, 0, 0] = 1
    assert torch.equal(total, expected)
    assert torch.equal(fr.add_zero_padded(small, large), expected)


def test_affine_layers_are_trainable():
    torch.manual_seed(0)
    model = fr.DlibFaceRec()
    affines = [affine for _, affine in model.weight_layers()]
    assert all(isinstance(a.scale, torch.nn.Parameter) and a.offset.requires_grad for a in affines)
    before = [(a.scale.detach().clone(), a.offset.detach().clone()) for a in (affines[0], affines[-1])]
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 150, 150)).pow(2).mean().backward()
    optimiser.step()
    for (scale, offset), affine in zip(before, (affines[0], affines[-1])):
        assert not torch.equal(scale, affine.scale) and not torch.equal(offset, affine.offset)


def test_feature_sizes_and_partial_stages():
    x = torch.zeros(1, 3, 150, 150)
    with torch.no_grad():
        for stages, dim in ((1, 32), (2, 64), (3, 128), (4, 256)):
            model = fr.DlibFaceRec(stages)
            assert model.feature_dim == dim and model(x).shape == (1, dim)
        assert fr.DlibFaceRec().embed(x).shape == (1, 128)
    with pytest.raises(ValueError):
        fr.DlibFaceRec(2).embed(x)
    assert sum(p.numel() for p in fr.DlibFaceRec().parameters()) == 5_614_592


def test_partial_model_inherits_the_first_stages(pretrained):
    small = fr.load_facerec_weights(fr.DlibFaceRec(stages=2))
    big = dict(pretrained.named_parameters())
    for name, param in small.named_parameters():
        assert torch.equal(param, big[name]), name


def test_fewer_blocks_per_stage_inherit_the_same_blocks(pretrained):
    """A network keeping only the leading blocks of each stage (and the fourth stage's first
    block) takes each kept block's weights from that block's place in the file, not from the
    next layers in file order."""
    for depths in ((1, 2, 2), (1, 1, 1), (3, 4, 3, 1)):
        small = fr.pretrained_facerec(depths=depths)
        big = dict(pretrained.named_parameters())
        blocks = {tuple(name.split(".")[1:3]) for name, _ in small.named_parameters() if name.startswith("stages.")}
        assert blocks == {(str(s), str(b)) for s, depth in enumerate(depths) for b in range(depth)}
        assert all(torch.equal(param, big[name]) for name, param in small.named_parameters()), depths
    assert small.embedding is None and small.feature_dim == 256
    assert fr.file_positions(fr.FULL_DEPTHS) == list(range(29))
    assert fr.file_positions((1, 1)) == [0, 1, 2, 7, 8]
    with pytest.raises(ValueError, match="depths"):
        fr.DlibFaceRec(depths=(0, 4))


def test_narrowed_blocks_keep_the_strongest_filters_and_compute_the_masked_network(pretrained):
    """A block whose first conv keeps 3/4 of its filters computes exactly what the full
    block computes with the other filters' outputs set to zero; the kept ones are those of
    largest affine-scaled L1 norm, and the stream between blocks keeps its full width."""
    depths = (1, 2, 2)
    narrow = fr.pretrained_facerec(depths=depths, inner=0.75)
    full = fr.pretrained_facerec(depths=depths)
    kept_by_block, hooks = {}, []
    for (name, block), narrow_block in zip(_blocks(full), (b for _, b in _blocks(narrow))):
        width = block.conv1.out_channels
        assert narrow_block.conv1.out_channels == fr.inner_width(width, 0.75) == width * 3 // 4
        assert narrow_block.conv2.out_channels == width  # the residual stream is not narrowed
        strength = block.conv1.weight.abs().sum(dim=(1, 2, 3)) * block.affine1.scale.abs().reshape(-1)
        kept = torch.sort(torch.topk(strength, narrow_block.conv1.out_channels).indices).values
        kept_by_block[name] = kept
        assert torch.equal(narrow_block.conv1.weight, block.conv1.weight[kept]), name
        assert torch.equal(narrow_block.conv2.weight, block.conv2.weight[:, kept]), name
        mask = torch.zeros(width)
        mask[kept] = 1
        hooks.append(block.affine1.register_forward_hook(
            lambda module, args, out, mask=mask.view(1, -1, 1, 1): out * mask))
    x = torch.randn(3, 3, 92, 92, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = full(x)
        for hook in hooks:
            hook.remove()
        assert torch.allclose(narrow(x), masked, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(full(x), masked, rtol=1e-2, atol=1e-3)  # the pruning did change it
    assert narrow.embedding is None
    assert [fr.inner_width(w, 0.5) for w in (32, 64, 128)] == [16, 32, 64]
    with pytest.raises(ValueError, match="inner"):
        fr.DlibFaceRec(depths=depths, inner=0)


def _blocks(model: fr.DlibFaceRec):
    return [(f"{s}.{b}", block) for s, stage in enumerate(model.stages) for b, block in enumerate(stage)]


def test_narrowed_student_backbones_build_from_the_file(pretrained):
    from agecli.modeling.backbones import build_model, count_parameters
    from agecli.modeling.encodings import build_encoding

    sizes = {arch: count_parameters(build_model(arch, build_encoding("ldae"), pretrained="dlib").backbone.body)
             for arch in ("dlib_facerec3_slim", "dlib_facerec3_slim75", "dlib_facerec3_slim50")}
    assert sizes["dlib_facerec3_slim"] > sizes["dlib_facerec3_slim75"] > sizes["dlib_facerec3_slim50"]
    assert sizes["dlib_facerec3_slim75"] < 0.8 * sizes["dlib_facerec3_slim"]


def test_missing_package_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "face_recognition_models" else real(name, *args))
    with pytest.raises(AgecliError, match=r"face_recognition_models.*\n.*pip install face_recognition_models"):
        fr.facerec_weights_path()


def test_missing_weight_file_says_reinstall(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("face_recognition_models", None, origin=str(tmp_path / "__init__.py"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: spec if name == "face_recognition_models" else real(name, *args))
    with pytest.raises(AgecliError, match="missing from the `face_recognition_models` package"):
        fr.facerec_weights_path()


def test_reader_rejects_other_files(tmp_path):
    bogus = tmp_path / "not_a_net.dat"
    bogus.write_bytes(b"\x01\x01\x05hello")
    with pytest.raises(AgecliError, match="not a dlib network file"):
        fr.read_dlib_net(bogus)


# --------------------------------------------------------------------------- as agecli backbones
def test_folding_the_affine_layers_keeps_the_function_and_gives_ordinary_weight_scales(pretrained):
    folded = fr.fold_affine(pretrained, fr.DlibFaceRec(folded=True)).eval()
    x = torch.randn(2, 3, 150, 150, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(folded.embed(x), pretrained.embed(x), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, fr.DlibAffine) for m in folded.modules())
    stored = [conv.weight.std().item() for conv, _ in pretrained.weight_layers()]
    absorbed = [conv.weight.std().item() for conv, _ in folded.weight_layers()]
    assert max(stored) < 0.02 and min(absorbed) > 5 * min(stored), (stored, absorbed)


def test_backbones_start_from_the_face_recognition_weights_and_round_trip(pretrained, tmp_path):
    from agecli.modeling.backbones import BACKBONES, build_model
    from agecli.modeling.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
    from agecli.modeling.encodings import build_encoding

    enc = build_encoding("ldae")
    teacher = build_model("dlib_facerec", enc, gender=True, pretrained="dlib").eval()
    student = build_model("facerec", enc, pretrained="dlib").backbone.body  # the alias
    assert teacher.backbone.body.embedding is None and teacher.feature_dim == 256
    x = torch.randn(4, 3, 150, 150, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(teacher.backbone.body(x), pretrained(x), rtol=1e-4, atol=1e-5)  # folded
        teacher.backbone.norm.momentum = None  # a cumulative average: exact after one batch
        teacher.train()(x)  # the feature norm learns the features' statistics, then standardises them
        features = teacher.eval()(x)["features"]
        assert torch.allclose(features.mean(0), torch.zeros(256), atol=0.05)
    small = build_model("dlib_facerec3", enc, pretrained="dlib").backbone.body.state_dict()
    full = student.state_dict()
    assert small and all(torch.equal(value, full[name]) for name, value in small.items())
    assert BACKBONES["dlib_facerec3"].mean == fr.FACEREC_MEAN and BACKBONES["dlib_facerec"].default_size == 150

    spec = ModelSpec(arch="dlib_facerec", encoding=enc.to_dict(), input_size=150, gender=True,
                     mean=fr.FACEREC_MEAN, std=fr.FACEREC_STD)
    save_checkpoint(tmp_path / "t.pt", teacher, spec)
    loaded, loaded_spec = load_checkpoint(tmp_path / "t.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x)["age"], teacher(x)["age"])
    assert loaded_spec.arch == "dlib_facerec" and tuple(loaded_spec.mean) == fr.FACEREC_MEAN


@pytest.mark.shared_data
def test_face_recognition_features_carry_age(pretrained):
    """Why this network is worth porting: a ridge regression on its pooled features,
    fitted on 240 real faces, predicts the age of 120 others far better than the same
    probe on a randomly initialised twin, which barely beats guessing the mean age
    (measured: MAE 7.3 against 13.4; the mean age alone: 14.2)."""
    if not UTKFACE_DIR.is_dir():
        pytest.skip("../shared/data/utkface is absent")
    from conftest import utkface_faces

    images, records = utkface_faces(360, 150, seed=1)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))  # files come sorted by age
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(fr.FACEREC_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(fr.FACEREC_STD).view(1, 3, 1, 1)
    ages = torch.tensor(records["age"].to_numpy(), dtype=torch.float64)
    torch.manual_seed(0)
    maes = {name: _ridge_probe_mae(model, x[order], ages[order]) for name, model in
            (("face recognition", pretrained), ("random", fr.DlibFaceRec().eval()))}
    assert maes["face recognition"] < 8.5 and maes["face recognition"] < maes["random"] - 3.0, maes


@torch.no_grad()
def _ridge_probe_mae(model: fr.DlibFaceRec, x: torch.Tensor, ages: torch.Tensor, fit: int = 240,
                     penalty: float = 300.0) -> float:
    features = torch.cat([model(chunk) for chunk in x.split(60)]).double()
    features = (features - features[:fit].mean(0)) / (features[:fit].std(0) + 1e-6)
    mean_age = ages[:fit].mean()
    a = features[:fit]
    weights = torch.linalg.solve(a.T @ a + penalty * torch.eye(a.shape[1], dtype=torch.float64),
                                 a.T @ (ages[:fit] - mean_age))
    return float((features[fit:] @ weights + mean_age - ages[fit:]).abs().mean())
