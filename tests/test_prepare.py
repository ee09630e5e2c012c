"""The prepare stage end to end: store format, splits, duplicates, resume, shards, rejects."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from agecli.errors import AgecliError
from agecli.stages.prepare import CHUNK_SIZES, prepare
from agecli.rundir import read_json
from agecli.store import FaceStore

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_utkface(root: Path, n: int = 40) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 255, (60, 60, 3), dtype=np.uint8)
        cv2.imwrite(str(root / f"{i % 90 + 1}_{i % 2}_{i % 5}_2017011{i:010d}.jpg.chip.jpg"), img)
    # byte-identical copies with conflicting labels, and the real name quirks
    src = root / f"1_0_0_2017011{0:010d}.jpg.chip.jpg"
    shutil.copy(src, root / "50_1_20170116174525125.jpg.chip.jpg")
    shutil.copy(src, root / "24_0_1_20170116220224657 .jpg.chip.jpg")
    (root / "55_0_0_20170116232725357jpg.chip.jpg").write_bytes(
        cv2.imencode(".jpg", np.zeros((60, 60, 3), np.uint8))[1].tobytes()[:400])  # truncated
    return root


def _read(run: Path):
    prep = run / "prepare"
    return (np.load(prep / "faces.npy"), (prep / "records.csv").read_bytes(), (prep / "rejects.csv").read_bytes())


def test_utkface_store_splits_and_duplicates(tmp_path):
    root = make_utkface(tmp_path / "UTKFace")
    res = prepare("utkface", root, tmp_path / "run", size=32)
    assert res["faces_stored"] == 42 and res["rejects"] == {"truncated": 1}
    assert res["quirks"] == {"missing_dot": 1, "missing_race": 1, "space_before_jpg": 1}
    assert res["duplicates"] == {"groups": 1, "files": 3, "conflicting_labels": 1}
    store = FaceStore.open(tmp_path / "run")
    assert store.images.shape == (42, 32, 32, 3) and store.alignment.method == "resize"
    assert store.alignment.template == "utkface_chip"
    rec = store.records
    assert set(rec["split"]) == {"train", "val", "test"}
    for _, group in rec.groupby("content"):
        assert group["split"].nunique() == 1
    manifest = read_json(tmp_path / "run" / "prepare" / "manifest.json")
    assert manifest["status"] == "complete" and manifest["protocol"]["kind"] == "holdout"
    rejects = pd.read_csv(tmp_path / "run" / "prepare" / "rejects.csv")
    assert rejects["reason"].tolist() == ["truncated"]
    again = prepare("utkface", root, tmp_path / "run", size=32)
    assert again["reused"] is True


def test_resume_after_kill_and_shards_give_identical_output(tmp_path, monkeypatch):
    monkeypatch.setitem(CHUNK_SIZES, "none", 8)
    root = make_utkface(tmp_path / "UTKFace", n=30)
    clean = _read(_prepared(root, tmp_path / "clean"))

    class Killed(Exception):
        pass

    calls = []

    def die(task, done, total):
        calls.append(done)
        if len(calls) == 3:
            raise Killed

    with pytest.raises(Killed):
        prepare("utkface", root, tmp_path / "killed", size=32, progress=die)
    manifest = read_json(tmp_path / "killed" / "prepare" / "manifest.json")
    assert manifest["status"] == "failed"
    with pytest.raises(AgecliError, match="not complete"):
        FaceStore.open(tmp_path / "killed")
    resumed = prepare("utkface", root, tmp_path / "killed", size=32)
    assert resumed["chunks_reused"] == 2 and resumed["chunks"] == 5
    assert _same(_read(tmp_path / "killed"), clean)

    part = prepare("utkface", root, tmp_path / "sharded", size=32, shard="1/2")
    assert part["chunks"] == 3
    prepare("utkface", root, tmp_path / "sharded", size=32, shard="2/2")
    final = prepare("utkface", root, tmp_path / "sharded", size=32)
    assert final["chunks_reused"] == 5
    assert _same(_read(tmp_path / "sharded"), clean)
    with pytest.raises(AgecliError, match="I/N"):
        prepare("utkface", root, tmp_path / "x", shard="two")


def _prepared(root, run):
    prepare("utkface", root, run, size=32)
    return run


def _same(a, b) -> bool:
    return np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_csv_bad_images_become_rejects(tmp_path):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "ok.jpg"), img)
    cv2.imwrite(str(tmp_path / "grey.png"), img[..., 0])
    cv2.imwrite(str(tmp_path / "deep.png"), img.astype(np.uint16) * 256)
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "ok.jpg").read_bytes()[:1500])
    (tmp_path / "junk.jpg").write_bytes(b"not a picture at all")
    (tmp_path / "labels.csv").write_text("path,age,gender\nok.jpg,30,m\ngrey.png,40,f\ndeep.png,50,\n"
                                         "cut.jpg,20,m\njunk.jpg,20,m\n../escape.jpg,20,m\n")
    res = prepare("csv", tmp_path / "labels.csv", tmp_path / "run", detector="none", size=24)
    assert res["faces_stored"] == 3
    assert res["rejects"] == {"truncated": 1, "unreadable": 1, "unsafe_path": 1}
    store = FaceStore.open(tmp_path / "run")
    assert sorted(store.records["path"]) == ["deep.png", "grey.png", "ok.jpg"]
    # nothing usable at all: an error naming the rejects, not a finished stage of 0 faces
    (tmp_path / "none.csv").write_text("path,age\njunk.jpg,20\n../escape.jpg,30\n")
    with pytest.raises(AgecliError, match=r"no face was stored from .*none\.csv \(rejects: unreadable 1, unsafe_path 1; "
                                          r"each with its path in .*rejects\.csv"):
        prepare("csv", tmp_path / "none.csv", tmp_path / "empty_run", detector="none", size=24)
    assert (tmp_path / "empty_run" / "prepare" / "rejects.csv").exists()
    with pytest.raises(AgecliError, match="Run prepare first|prepare .*(failed|not complete|interrupted)"):
        FaceStore.open(tmp_path / "empty_run")


def test_the_summary_shows_duplicates_and_the_next_step_that_works(tmp_path, capsys):
    """Conflicting labels on identical images were only in the manifest, and an unlabelled
    `folder` run was told `next: agecli train`, which refuses it."""
    from agecli.cli.commands.prepare_cmd import _summary

    rng = np.random.default_rng(5)
    img = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(tmp_path / "img" / name), img)
    others = [f"o{i}.jpg" for i in range(12)]   # enough images for a train and a val split
    for name in others:
        cv2.imwrite(str(tmp_path / "img" / name), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    (tmp_path / "img" / "labels.csv").write_text("path,age\na.jpg,30\nb.jpg,50\n" + "".join(f"{n},40\n" for n in others))
    labelled = prepare("csv", tmp_path / "img" / "labels.csv", tmp_path / "labelled", detector="none", size=24,
                       val_fraction=0.3, test_fraction=0.0)
    assert labelled["splits"].get("train") and labelled["splits"].get("val") and labelled["warnings"] == []
    _summary(labelled)
    out = capsys.readouterr().out
    assert "duplicates: 1 groups of identical images (2 files" in out and "1 with conflicting labels" in out
    assert f"next: agecli train --run {tmp_path / 'labelled'}" in out
    _summary(prepare("folder", tmp_path / "img", tmp_path / "unlabelled", detector="none", size=24))
    out = capsys.readouterr().out
    assert f"next: agecli distill --run {tmp_path / 'unlabelled'} --teacher MODEL" in out and "agecli train" not in out


def test_a_label_on_a_group_photo_is_said_to_go_to_its_largest_central_face(tmp_path, capsys):
    pytest.importorskip("facenet_pytorch", reason="facenet-pytorch is not installed")
    from agecli.cli.commands.prepare_cmd import _summary

    photos = Path(__file__).resolve().parents[1] / "agecli" / "sample" / "photos"
    shutil.copy(photos / "group1.jpg", tmp_path / "group1.jpg")
    (tmp_path / "labels.csv").write_text("path,age\ngroup1.jpg,30\n")
    result = prepare("csv", tmp_path / "labels.csv", tmp_path / "run", size=32, workers=0)
    assert result["chosen_by"] == {"largest_central": 1}
    _summary(result)
    assert ("1 label went to the largest, most central of several faces in its image (no box said whose it is"
            in " ".join(capsys.readouterr().out.split()))


def test_bad_arguments(tmp_path):
    with pytest.raises(AgecliError, match="does not exist"):
        prepare("utkface", tmp_path / "missing", tmp_path / "run")
    with pytest.raises(AgecliError, match="unknown dataset"):
        prepare("imdb", tmp_path, tmp_path / "run")
    with pytest.raises(AgecliError, match="size"):
        prepare("utkface", tmp_path, tmp_path / "run", size=4)
    # an unknown template is refused whatever the detector (it was recorded as given with none)
    with pytest.raises(AgecliError, match="unknown alignment template 'bogus'"):
        prepare("utkface", tmp_path, tmp_path / "run", detector="none", template="bogus")


@pytest.mark.shared_data
def test_real_utkface_subset(tmp_path):
    root = SHARED / "utkface" / "UTKFace"
    if not root.is_dir():
        pytest.skip(f"UTKFace train pool not found at {root}")
    res = prepare("utkface", root, tmp_path / "run", limit=60, size=64)
    assert res["faces_stored"] == 60 and res["rows"] == 19010
    store = FaceStore.open(tmp_path / "run")
    assert store.images.shape == (60, 64, 64, 3)
    # a seeded random sample, not the first names in sorted order (which are all babies:
    # UTKFace names start with the age); the same seed gives the same sample
    ages = store.records["age"]
    assert ages.min() < 10 and ages.max() > 50 and 20 < ages.median() < 45, sorted(ages)
    again = prepare("utkface", root, tmp_path / "again", limit=60, size=64)
    assert again["faces_stored"] == 60
    assert list(FaceStore.open(tmp_path / "again").records["path"]) == list(store.records["path"])


@pytest.mark.shared_data
def test_real_adience_sample(tmp_path):
    root = SHARED / "adience-sample"
    if not (root / "faces").is_dir():
        pytest.skip(f"Adience sample not found at {root}")
    pytest.importorskip("facenet_pytorch", reason="facenet-pytorch is not installed")
    res = prepare("adience", root, tmp_path / "run", size=64, workers=0)
    assert res["rows"] == 19370 and res["faces_stored"] == 19
    assert res["missing"] == 19370 - 19 - sum(res["rejects"].values())
    missing = (tmp_path / "run" / "prepare" / "missing.txt").read_text().splitlines()
    assert len(missing) == res["missing"]
    store = FaceStore.open(tmp_path / "run")
    assert set(store.records["fold"]) == {0} and store.alignment.method == "similarity"
    # the 19 faces are few subjects: whichever split they fall in, the others are empty, and prepare says so
    assert res["splits"] == {"train": 19} and len(res["warnings"]) == 1
    assert res["warnings"][0].startswith("no face is in the val split ({'train': 19})")
    carved = prepare("adience", root, tmp_path / "run2", size=64, workers=0, val_fraction=0.3)
    assert carved["splits"] == {"val": 19} and carved["warnings"][0].startswith("no face is in the train split")
    assert "--val-fraction (now 0.3" in carved["warnings"][0]


def test_prepare_keywords_cli_defaults_and_checks_come_from_prepare_options():
    """PrepareOptions is the one source of prepare's defaults: the function's keywords and the
    CLI's options are its fields, with its defaults; its checks give the CLI's wording."""
    import dataclasses
    import inspect

    from typer.main import get_command

    from agecli.cli.app import app
    from agecli.options import PrepareOptions

    fields = {f.name: f.default for f in dataclasses.fields(PrepareOptions)}
    keywords = {p.name: p.default for p in inspect.signature(prepare).parameters.values()
                if p.kind is p.KEYWORD_ONLY and p.name != "progress"}
    assert keywords == fields
    cli = {p.name: p.default for p in get_command(app).commands["prepare"].params}
    shared = set(cli) & set(fields)
    assert shared >= {"size", "margin", "template", "seed", "val_fraction", "test_fraction", "max_side", "device"}
    assert {name: cli[name] for name in shared} == {name: fields[name] for name in shared}

    assert PrepareOptions(shard="2/4").shard_slot() == (1, 4) and PrepareOptions().shard_slot() == (0, 0)
    for bad, wording in (({"size": 4}, "--size 4 is out of range"), ({"detector": "dlib"}, "unknown detector"),
                         ({"val_fraction": 0.5, "test_fraction": 0.5}, "sum to less than 1"),
                         ({"shard": "3/2"}, "I must be between 1 and N"), ({"margin": 5}, "--margin 5")):
        with pytest.raises(AgecliError, match=wording):
            PrepareOptions(**bad)
