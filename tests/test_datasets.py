"""Dataset parsers on small fixtures in the real published formats (and the real Adience
fold files where ../shared/data is present)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from agecli.data.datasets import adience_age, get_dataset, parse_utkface_name, safe_relpath
from agecli.errors import AgecliError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HEADER = ("user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\t"
          "fiducial_yaw_angle\tfiducial_score")


def _jpg(path: Path, seed: int = 0, size=(48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    return path


def make_adience(root: Path) -> Path:
    rows = {
        0: ["u1@N00\ta_o.jpg\t1\t(25, 32)\tf\t0\t414\t1086\t1383\t-115\t30\t17",
            "u1@N00\tb_o.jpg\t2\t35\tm\t301\t105\t640\t641\t0\t0\t94",
            "u1@N00\tc_o.jpg\t3\tNone\t\t1\t2\t3\t4\t0\t0\t1",
            "u1@N00\td_o.jpg\t4\t(27, 32)\tu\t1\t2\t3\t4\t0\t0\t1"],
        1: ["u2@N01\te_o.jpg\t5\t(38, 48)\tf\t1\t2\t3\t4\t0\t0\t1",
            "u2@N01\tf_o.jpg\t6\t(8, 12)\tm\t1\t2\t3\t4\t0\t0\t1"],
        2: ["u3@N02\tg_o.jpg\t7\t13\tf\t1\t2\t3\t4\t0\t0\t1"],
        3: ["u4@N03\th_o.jpg\t8\t(60, 100)\tm\t1\t2\t3\t4\t0\t0\t1"],
        4: ["u5@N04\ti_o.jpg\t9\t(0, 2)\tf\t1\t2\t3\t4\t0\t0\t1"],
    }
    for fold, lines in rows.items():
        # like the real files: tab separated, header first, no newline at the end
        (root / f"fold_{fold}_data.txt").write_text("\n".join([HEADER, *lines]), encoding="utf-8")
    for user, original, face in [("u1@N00", "a_o.jpg", 1), ("u1@N00", "b_o.jpg", 2), ("u2@N01", "f_o.jpg", 6)]:
        _jpg(root / "faces" / user / f"coarse_tilt_aligned_face.{face}.{original}", seed=face)
    return root


def test_adience_fixture(tmp_path):
    parsed = get_dataset("adience").parse(make_adience(tmp_path))
    assert parsed.rows == 9
    got = {s.path: s for s in parsed.samples}
    a = got["faces/u1@N00/coarse_tilt_aligned_face.1.a_o.jpg"]
    assert (a.group, a.age, a.gender, a.fold, a.subject) == (4, 28.5, 1, 0, "u1@N00")
    b = got["faces/u1@N00/coarse_tilt_aligned_face.2.b_o.jpg"]
    assert b.group == 5 and b.gender == 0  # 35 sits in a gap: nearest group, ties go older
    assert got["faces/u2@N01/coarse_tilt_aligned_face.6.f_o.jpg"].fold == 1
    reasons = sorted(r.reason for r in parsed.rejects)
    assert reasons == ["age_missing", "age_range_ambiguous"]
    assert len(parsed.missing) == 4  # d (27,32 mapped), g, h, i are listed but absent
    assert parsed.quirks["age:range_mapped"] == 1 and parsed.quirks["gender_unknown"] == 1
    with pytest.raises(AgecliError, match="absent"):
        get_dataset("adience").parse(tmp_path, strict=True)


def test_adience_age_rule():
    assert adience_age("(0, 2)") == (0, "official_group")
    assert adience_age("(38, 42)") == (5, "range_mapped")
    assert adience_age("(8, 23)") == (None, "age_range_ambiguous")
    assert adience_age("(25, 23)") == (None, "age_range_invalid")
    assert adience_age("3") == (1, "integer_nearest_group")
    assert adience_age("57") == (7, "integer_nearest_group")  # 3 from 60, 4 from 53
    assert adience_age("29") == (4, "integer_in_group")
    assert adience_age("None")[0] is None and adience_age("")[0] is None
    assert adience_age("abc") == (None, "age_unparsable")


UTK_NAMES = ["24_0_1_20170116220224657 .jpg.chip.jpg", "39_1_20170116174525125.jpg.chip.jpg",
             "55_0_0_20170116232725357jpg.chip.jpg", "1_0_2_20161219140530307.jpg.chip.jpg",
             "200_0_0_20170112215240346.jpg.chip.jpg", "not_a_face.jpg"]


def test_utkface_names_and_quirks(tmp_path):
    for i, name in enumerate(UTK_NAMES):
        _jpg(tmp_path / name, seed=i)
    (tmp_path / "README.txt").write_text("not an image")
    parsed = get_dataset("utkface").parse(tmp_path)
    assert dict(parsed.quirks) == {"space_before_jpg": 1, "missing_race": 1, "missing_dot": 1}
    ages = sorted(s.age for s in parsed.samples)
    assert ages == [1.0, 24.0, 39.0, 55.0]
    assert sorted(r.reason for r in parsed.rejects) == ["label_out_of_range", "unparsable_name"]
    assert parse_utkface_name("39_1_20170116174525125.jpg.chip.jpg")[0]["race"] == -1


def test_wrong_layout_is_explained(tmp_path):
    for i, name in enumerate(UTK_NAMES[:4]):
        _jpg(tmp_path / name, seed=i)
    with pytest.raises(AgecliError, match="try `utkface`"):
        get_dataset("adience").parse(tmp_path)
    with pytest.raises(AgecliError, match="does not exist"):
        get_dataset("utkface").parse(tmp_path / "nope")
    with pytest.raises(AgecliError, match="choose one of: adience"):
        get_dataset("utk")


def test_fgnet(tmp_path):
    for name in ["001A02.JPG", "001A10.JPG", "002A16a.JPG", "readme.JPG"]:
        _jpg(tmp_path / "images" / name)
    (tmp_path / "points").mkdir()
    (tmp_path / "points" / "001a02.pts").write_text("version: 1\nn_points: 3\n{\n10 20\n30 5\n20 40\n}\n")
    parsed = get_dataset("fgnet").parse(tmp_path)
    got = {s.path: s for s in parsed.samples}
    assert got["images/001A02.JPG"].age == 2 and got["images/001A02.JPG"].fold == 1
    assert got["images/001A02.JPG"].box == (10, 5, 30, 40)
    assert got["images/002A16a.JPG"].subject == "002" and parsed.quirks["variant_suffix"] == 1
    assert [r.reason for r in parsed.rejects] == ["unparsable_name"]


def test_lap2016(tmp_path):
    for split in ("train", "valid"):
        _jpg(tmp_path / split / "000001.jpg")
    (tmp_path / "train_gt.csv").write_text("image,mean,stdv\n000001.jpg,25.5,3.2\n000002.jpg,30,4\n"
                                           "../../etc/passwd,20,1\n000003.jpg,-4,1\n")
    (tmp_path / "valid_gt.csv").write_text("000001.jpg;40.25;5.5\n")
    parsed = get_dataset("lap2016").parse(tmp_path)
    (train,) = [s for s in parsed.samples if s.split == "train"]
    assert (train.age, train.age_std, train.path) == (25.5, 3.2, "train/000001.jpg")
    assert [s.split for s in parsed.samples] == ["train", "val"]
    assert parsed.missing == ["train/000002.jpg"]
    assert sorted(r.reason for r in parsed.rejects) == ["label_out_of_range", "unsafe_path"]


def test_csv_and_path_escape(tmp_path):
    _jpg(tmp_path / "imgs" / "a.jpg")
    _jpg(tmp_path / "imgs" / "b.jpg", seed=1)
    (tmp_path / "outside.jpg").write_bytes(b"x")
    (tmp_path / "data").mkdir()
    _jpg(tmp_path / "data" / "c.jpg", seed=2)
    table = tmp_path / "data" / "labels.csv"
    table.write_text("path,age,gender,split,group\n"
                     "c.jpg,31,f,test,\n"
                     "../outside.jpg,20,m,,\n"
                     "/etc/passwd,20,m,,\n"
                     "c.jpg,,m,,3\n"
                     "c.jpg,300,m,,\n"
                     "c.jpg,30,x,,\n"
                     "gone.jpg,30,,,\n")
    parsed = get_dataset("csv").parse(table)
    assert [(s.path, s.age, s.gender, s.split) for s in parsed.samples] == [
        ("c.jpg", 31.0, 1, "test"), ("c.jpg", 17.5, 0, "")]
    reasons = sorted(r.reason for r in parsed.rejects)
    assert reasons == ["label_out_of_range", "label_out_of_range", "unsafe_path", "unsafe_path"]
    assert parsed.missing == ["gone.jpg"]


def test_safe_relpath():
    assert safe_relpath("a/b.jpg") == "a/b.jpg"
    assert safe_relpath("./a/./b.jpg") == "a/b.jpg"
    for bad in ("../a.jpg", "a/../../b.jpg", "/abs.jpg", "C:/x.jpg", "a\\..\\..\\b.jpg", ""):
        assert safe_relpath(bad) is None, bad


def test_folder_any_nesting(tmp_path):
    _jpg(tmp_path / "a" / "b" / "one.jpg")
    _jpg(tmp_path / "two.PNG")
    (tmp_path / ".hidden").mkdir()
    _jpg(tmp_path / ".hidden" / "x.jpg")
    parsed = get_dataset("folder").parse(tmp_path)
    assert [s.path for s in parsed.samples] == ["a/b/one.jpg", "two.PNG"]
    assert all(math.isnan(s.age) for s in parsed.samples)


@pytest.mark.shared_data
def test_real_adience_fold_files():
    root = SHARED / "adience-sample"
    if not (root / "fold_0_data.txt").exists():
        pytest.skip(f"real Adience fold files not found at {root}")
    parsed = get_dataset("adience").parse(root)
    assert parsed.rows == 19370
    assert len(parsed.samples) == 19
    assert len(parsed.samples) + len(parsed.missing) + len(parsed.rejects) == 19370
    assert parsed.quirks["age:official_group"] == 17393
    assert parsed.quirks["age:age_missing"] == 748
    assert {s.fold for s in parsed.samples} == {0}


@pytest.mark.shared_data
def test_real_utkface_names():
    root = SHARED / "utkface" / "UTKFace"
    if not root.is_dir():
        pytest.skip(f"UTKFace train pool not found at {root}")
    parsed = get_dataset("utkface").parse(root)
    assert len(parsed.samples) == 19010 and not parsed.rejects
    assert dict(parsed.quirks) == {"space_before_jpg": 1, "missing_race": 3, "missing_dot": 1}
