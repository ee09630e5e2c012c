"""Dataset parsers, registered by name: each reads one real published layout.

A parser turns a dataset root into `Parsed`: samples (image path relative to the root,
labels, fold, subject, optional metadata face box, optional official split), rejects with
a reason, the quirks it met (counted), and images listed but absent (`missing`).

    get_dataset("utkface").parse(Path("UTKFace"))      # unknown names list the valid ones

Paths read from label files never leave the root: absolute paths and `..` are rejected.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

from agecli.errors import AgecliError
from agecli.labels import ADIENCE_GROUPS, GENDER_CODES, GROUP_NAMES, UNKNOWN, group_midpoint, group_of_age

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MAX_LABEL_AGE = 120


@dataclass
class Sample:
    path: str                       # posix path relative to Parsed.image_root
    age: float = math.nan
    age_std: float = math.nan
    gender: int = UNKNOWN
    race: int = UNKNOWN
    group: int = UNKNOWN
    fold: int = -1
    subject: str = ""
    split: str = ""                 # official split (train/val/test) where the dataset has one
    box: tuple[float, float, float, float] | None = None  # metadata face box, source pixels


@dataclass
class Reject:
    path: str
    reason: str
    detail: str = ""


@dataclass
class Parsed:
    image_root: Path
    samples: list[Sample] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    quirks: Counter = field(default_factory=Counter)
    missing: list[str] = field(default_factory=list)
    rows: int = 0                   # label rows / files considered


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: how to parse it and how its images are best handled."""

    name: str
    description: str
    parse_fn: Callable[[Path, bool], Parsed]
    protocol: str                   # folds | loso | official | holdout | none
    label_space: str                # group | age | apparent_age | none
    default_detector: str = "mtcnn"
    native_template: str = ""       # template its crops already follow (see faces.TEMPLATES)
    min_face_fraction: float = 0.05  # smallest face searched, fraction of the shorter side
    pad_fraction: float = 0.0       # border added before detection (tight crops)
    crop_centred: bool = False      # images are crops centred on the labelled face
    all_faces: bool = False         # store every face (unlabelled photos)

    def parse(self, root: str | os.PathLike, strict: bool = False) -> Parsed:
        root = Path(root)
        if not root.exists():
            raise AgecliError(f"dataset root {root} does not exist; pass the folder that holds the "
                              f"{self.name} files with --root.")
        return self.parse_fn(root, strict)


DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} registered twice")
    DATASETS[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(DATASETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise AgecliError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}.{hint}") from None


def list_datasets() -> list[str]:
    return list(DATASETS)


# --------------------------------------------------------------------------- helpers
def safe_relpath(text: str) -> str | None:
    """A dataset-relative posix path, or None if it is absolute or climbs out with `..`."""
    text = text.strip().replace("\\", "/")
    if not text or text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        return None
    parts = PurePosixPath(text).parts
    if any(part == ".." for part in parts):
        return None
    return str(PurePosixPath(*[p for p in parts if p != "."]))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _layout_hint(root: Path) -> str:
    """What the folder looks like, to explain a wrong-layout error."""
    if root.is_file():
        return f"{root} is a file"
    names = [p.name for p in root.iterdir()][:5000] if root.is_dir() else []
    if any(re.match(r"fold_\d_data\.txt$", n) for n in names):
        return "it holds Adience fold_*_data.txt files (try `adience`)"
    if sum(bool(_UTK_RE.match(n)) for n in names) >= 3:
        return "its files are named like UTKFace chips age_gender_race_date.jpg.chip.jpg (try `utkface`)"
    if (root / "UTKFace").is_dir():
        return "it has a UTKFace/ folder (try `utkface`)"
    if sum(bool(_FGNET_RE.match(n)) for n in names) >= 3 or (root / "images").is_dir() and any(
            _FGNET_RE.match(p.name) for p in (root / "images").iterdir()):
        return "its files are named like FG-NET (001A02.JPG; try `fgnet`)"
    if any(n.lower() in _LAP_FILES["train"] + _LAP_FILES["val"] for n in names):
        return "it holds ChaLearn LAP ground-truth CSVs (try `lap2016`)"
    images = sum(n.lower().endswith(tuple(IMAGE_SUFFIXES)) for n in names)
    return f"it holds {len(names)} entries, {images} of them images (for unlabelled photos try `folder`)"


def _wrong_layout(dataset: str, root: Path, expected: str) -> AgecliError:
    return AgecliError(f"{root} does not look like {dataset}: expected {expected}; {_layout_hint(root)}.")


# --------------------------------------------------------------------------- adience
ADIENCE_HEADER = ["user_id", "original_image", "face_id", "age", "gender", "x", "y", "dx", "dy",
                  "tilt_ang", "fiducial_yaw_angle", "fiducial_score"]
_RANGE_RE = re.compile(r"^\(\s*(\d+)\s*,\s*(\d+)\s*\)$")
_ADIENCE_IMAGE_DIRS = (("faces", "coarse_tilt_aligned_face"), ("aligned", "landmark_aligned_face"))


def adience_age(text: str) -> tuple[int | None, str]:
    """Map Adience's messy age column to a group 0-7, with the rule that decided it.

    - one of the 8 official groups "(lo, hi)": that group ("official_group");
    - a bare integer: the group containing it ("integer_in_group"), else the nearest group,
      ties to the older one, as `labels.group_of_age` ("integer_nearest_group");
    - another range "(a, b)": the group that holds at least 80% of the range
      ("range_mapped"; e.g. (27, 32) -> (25, 32), (38, 42) -> (38, 43)); ranges spread over
      groups or gaps are rejected ("age_range_ambiguous": (38, 48), (8, 23));
      reversed ranges such as the old release's "(25, 23)" are rejected ("age_range_invalid");
    - "None" or blank: rejected ("age_missing"); anything else "age_unparsable".
    """
    text = text.strip()
    if text in ("", "None"):
        return None, "age_missing"
    if text in GROUP_NAMES:
        return GROUP_NAMES.index(text), "official_group"
    if text.isdigit():
        age = int(text)
        if age > MAX_LABEL_AGE:
            return None, "age_out_of_range"
        group = group_of_age(age)
        lo, hi = ADIENCE_GROUPS[group]
        return group, "integer_in_group" if lo <= age <= hi else "integer_nearest_group"
    match = _RANGE_RE.match(text)
    if not match:
        return None, "age_unparsable"
    a, b = int(match.group(1)), int(match.group(2))
    if b <= a:
        return None, "age_range_invalid"
    for index, (lo, hi) in enumerate(ADIENCE_GROUPS):
        overlap = max(0, min(b, hi) - max(a, lo))
        if overlap >= 0.8 * (b - a):
            return index, "range_mapped"
    return None, "age_range_ambiguous"


def _parse_adience(root: Path, strict: bool) -> Parsed:
    fold_files = [root / f"fold_{i}_data.txt" for i in range(5)]
    present = [f for f in fold_files if f.is_file()]
    if not present:
        raise _wrong_layout("adience", root, "fold_0_data.txt .. fold_4_data.txt beside a faces/ or aligned/ folder")
    if len(present) < 5:
        absent = [f.name for f in fold_files if not f.is_file()]
        raise AgecliError(f"{root}: Adience fold files {', '.join(absent)} are missing; all five "
                          "(fold_0_data.txt .. fold_4_data.txt) are needed for the official protocol.")
    image_dir, prefix = next(((d, p) for d, p in _ADIENCE_IMAGE_DIRS if (root / d).is_dir()), (None, None))
    if image_dir is None:
        raise AgecliError(f"{root}: found the Adience fold files but no faces/ (or aligned/) folder of "
                          "images; unpack the faces archive there (faces/<user_id>/coarse_tilt_aligned_face.*.jpg).")
    parsed = Parsed(image_root=root)
    listings: dict[str, set[str]] = {}
    seen: set[str] = set()
    for fold, path in enumerate(fold_files):
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        header = lines[0].split("\t") if lines else []
        if [h.strip().lower() for h in header[:5]] != ADIENCE_HEADER[:5]:
            raise AgecliError(f"{path}: first line is not the Adience header "
                              f"({' '.join(ADIENCE_HEADER[:5])} ...); got {lines[0][:80] if lines else 'an empty file'!r}.")
        for lineno, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            parsed.rows += 1
            cols = line.split("\t")
            where = f"{path.name}:{lineno}"
            if len(cols) < 5:
                parsed.rejects.append(Reject(where, "malformed_row", f"{len(cols)} columns"))
                continue
            user, original, face_id, age_text, gender_text = (c.strip() for c in cols[:5])
            rel = safe_relpath(f"{image_dir}/{user}/{prefix}.{face_id}.{original}")
            if rel is None or "/" in user or "/" in original or not user or not original:
                parsed.rejects.append(Reject(where, "unsafe_path", f"{user}/{original}"))
                continue
            group, how = adience_age(age_text)
            parsed.quirks[f"age:{how}"] += 1
            if group is None:
                parsed.rejects.append(Reject(rel, how, age_text))
                continue
            gender = {"m": 0, "f": 1}.get(gender_text.lower(), UNKNOWN)
            if gender == UNKNOWN:
                parsed.quirks["gender_unknown" if gender_text.lower() == "u" else "gender_blank"] += 1
            if rel in seen:
                parsed.quirks["duplicate_row"] += 1
                parsed.rejects.append(Reject(rel, "duplicate_row", where))
                continue
            seen.add(rel)
            folder = root / image_dir / user
            if user not in listings:
                listings[user] = set(os.listdir(folder)) if folder.is_dir() else set()
            if rel.rsplit("/", 1)[1] not in listings[user]:
                parsed.missing.append(rel)
                continue
            parsed.samples.append(Sample(path=rel, age=group_midpoint(group), group=group, gender=gender,
                                         fold=fold, subject=user))
    if strict and parsed.missing:
        raise AgecliError(f"{root}: {len(parsed.missing)} images listed in the fold files are absent "
                          f"(first: {parsed.missing[0]}); drop --strict to prepare the ones present.")
    return parsed


# --------------------------------------------------------------------------- utkface
# [age]_[gender]_[race]_[datetime].jpg.chip.jpg with the release's quirks: no race field,
# a space before ".jpg", no dot before "jpg".
_UTK_RE = re.compile(r"^(?P<age>\d+)_(?P<gender>\d+)_(?:(?P<race>\d+)_)?(?P<date>\d{8,})(?P<space>\s*)"
                     r"(?P<dot>\.?)jpg\.chip\.jpg$", re.IGNORECASE)


def parse_utkface_name(name: str) -> tuple[dict | None, list[str]]:
    """Labels from a UTKFace file name, plus the quirks the name shows."""
    match = _UTK_RE.match(name)
    if not match:
        return None, []
    quirks = []
    if match.group("race") is None:
        quirks.append("missing_race")
    if match.group("space"):
        quirks.append("space_before_jpg")
    if not match.group("dot"):
        quirks.append("missing_dot")
    race = int(match.group("race")) if match.group("race") is not None else UNKNOWN
    return dict(age=int(match.group("age")), gender=int(match.group("gender")), race=race), quirks


def _parse_utkface(root: Path, strict: bool) -> Parsed:
    base = root
    if not any(_UTK_RE.match(p.name) for p in _first(root.iterdir() if root.is_dir() else [], 200)) \
            and (root / "UTKFace").is_dir():
        base = root / "UTKFace"
    if not base.is_dir():
        raise _wrong_layout("utkface", root, "a folder of age_gender_race_date.jpg.chip.jpg files")
    parsed = Parsed(image_root=root)
    prefix = "" if base == root else "UTKFace/"
    files = sorted(p.name for p in base.iterdir() if p.is_file() and not p.name.startswith("."))
    for name in files:
        if not name.lower().endswith((".jpg", ".jpeg", ".png")):
            continue
        parsed.rows += 1
        labels, quirks = parse_utkface_name(name)
        if labels is None:
            parsed.rejects.append(Reject(prefix + name, "unparsable_name"))
            continue
        for q in quirks:
            parsed.quirks[q] += 1
        if not 0 <= labels["age"] <= MAX_LABEL_AGE or labels["gender"] not in (0, 1):
            parsed.rejects.append(Reject(prefix + name, "label_out_of_range", f"age {labels['age']} gender {labels['gender']}"))
            continue
        if labels["race"] not in (0, 1, 2, 3, 4, UNKNOWN):
            parsed.quirks["race_out_of_range"] += 1
            labels["race"] = UNKNOWN
        parsed.samples.append(Sample(path=prefix + name, age=float(labels["age"]), gender=labels["gender"],
                                     race=labels["race"], group=group_of_age(labels["age"])))
    if not parsed.samples:
        raise _wrong_layout("utkface", root, "files named age_gender_race_date.jpg.chip.jpg")
    return parsed


def _first(iterable, n):
    out = []
    for item in iterable:
        out.append(item)
        if len(out) >= n:
            break
    return out


# --------------------------------------------------------------------------- fgnet
_FGNET_RE = re.compile(r"^(?P<subject>\d{3})A(?P<age>\d{2})(?P<variant>[a-z]?)\.jpe?g$", re.IGNORECASE)


def _read_pts(path: Path) -> tuple[float, float, float, float] | None:
    """Box around the landmarks of an FG-NET .pts file (68 points in `{ ... }`)."""
    try:
        text = path.read_text(errors="replace")
        body = text[text.index("{") + 1:text.index("}")]
        nums = [float(v) for v in body.split()]
        xs, ys = nums[0::2], nums[1::2]
        return (min(xs), min(ys), max(xs), max(ys)) if xs else None
    except (OSError, ValueError):
        return None


def _parse_fgnet(root: Path, strict: bool) -> Parsed:
    base = root / "images" if (root / "images").is_dir() else root
    if not base.is_dir():
        raise _wrong_layout("fgnet", root, "FG-NET images named like 001A02.JPG (in the root or images/)")
    points = root / "points"
    parsed = Parsed(image_root=root)
    prefix = "" if base == root else "images/"
    for path in sorted(p for p in base.iterdir() if p.is_file() and _is_image(p)):
        parsed.rows += 1
        match = _FGNET_RE.match(path.name)
        if not match:
            parsed.rejects.append(Reject(prefix + path.name, "unparsable_name"))
            continue
        if match.group("variant"):
            parsed.quirks["variant_suffix"] += 1
        subject = int(match.group("subject"))
        box = None
        if points.is_dir():
            pts = points / (path.stem.lower() + ".pts")
            box = _read_pts(pts) if pts.is_file() else None
        parsed.samples.append(Sample(path=prefix + path.name, age=float(match.group("age")), fold=subject,
                                     subject=f"{subject:03d}", group=group_of_age(int(match.group("age"))),
                                     box=box))
    if not parsed.samples:
        raise _wrong_layout("fgnet", root, "FG-NET images named like 001A02.JPG (in the root or images/)")
    return parsed


# --------------------------------------------------------------------------- lap2016
# ChaLearn LAP 2016 apparent age ("Apparent age V2"): train/ valid/ test/ image folders and
# train_gt.csv, valid_gt.csv, test_gt.csv with `image,mean,stdv` rows (mean and standard
# deviation of the apparent-age votes). Header optional, ";" accepted as separator.
_LAP_FILES = {"train": ["train_gt.csv"], "val": ["valid_gt.csv", "validation_gt.csv", "val_gt.csv"],
              "test": ["test_gt.csv"]}
_LAP_DIRS = {"train": ["train"], "val": ["valid", "validation", "val"], "test": ["test"]}


def _parse_lap2016(root: Path, strict: bool) -> Parsed:
    parsed = Parsed(image_root=root)
    found = False
    lower = {p.name.lower(): p for p in root.iterdir()} if root.is_dir() else {}
    for split, names in _LAP_FILES.items():
        csv_path = next((lower[n] for n in names if n in lower), None)
        if csv_path is None:
            continue
        found = True
        folder = next((lower[d].name for d in _LAP_DIRS[split] if d in lower and lower[d].is_dir()), "")
        text = csv_path.read_text(encoding="utf-8-sig", errors="replace")
        delimiter = ";" if text.count(";") > text.count(",") else ","
        for lineno, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1):
            if not row or not "".join(row).strip():
                continue
            if lineno == 1 and not _is_float(row[1] if len(row) > 1 else ""):
                continue  # header
            parsed.rows += 1
            where = f"{csv_path.name}:{lineno}"
            if len(row) < 3 or not _is_float(row[1]) or not _is_float(row[2]):
                parsed.rejects.append(Reject(where, "malformed_row", ",".join(row)[:80]))
                continue
            rel = safe_relpath(f"{folder}/{row[0]}" if folder else row[0])
            if rel is None:
                parsed.rejects.append(Reject(where, "unsafe_path", row[0]))
                continue
            mean, std = float(row[1]), float(row[2])
            if not 0 <= mean <= MAX_LABEL_AGE or std < 0:
                parsed.rejects.append(Reject(rel, "label_out_of_range", f"mean {mean} std {std}"))
                continue
            if not (root / rel).is_file():
                parsed.missing.append(rel)
                continue
            parsed.samples.append(Sample(path=rel, age=mean, age_std=std, split=split,
                                         group=group_of_age(mean)))
    if not found:
        raise _wrong_layout("lap2016", root, "train_gt.csv / valid_gt.csv / test_gt.csv beside train/ valid/ test/")
    if strict and parsed.missing:
        raise AgecliError(f"{root}: {len(parsed.missing)} images listed in the CSVs are absent "
                          f"(first: {parsed.missing[0]}); drop --strict to prepare the ones present.")
    return parsed


def _is_float(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


# --------------------------------------------------------------------------- folder
def _parse_folder(root: Path, strict: bool) -> Parsed:
    if not root.is_dir():
        raise AgecliError(f"{root} is not a folder; `folder` takes a folder of photos (any nesting).")
    parsed = Parsed(image_root=root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _is_image(path):
                parsed.rows += 1
                rel = path.relative_to(root).as_posix()
                if path.is_file():
                    parsed.samples.append(Sample(path=rel))
                else:  # a named pipe or device called *.jpg: reading it would block or never end
                    parsed.rejects.append(Reject(rel, "not_a_file", "not a regular file"))
    parsed.samples.sort(key=lambda s: s.path)
    if not parsed.samples:
        raise AgecliError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return parsed


# --------------------------------------------------------------------------- csv
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _parse_csv(root: Path, strict: bool) -> Parsed:
    if root.is_dir():
        candidates = sorted(root.glob("*.csv"))
        if len(candidates) != 1:
            raise AgecliError(f"{root}: `csv` needs --root FILE.csv (or a folder with exactly one .csv; "
                              f"found {len(candidates)}). Columns: path,age[,gender][,split][,group].")
        csv_path = candidates[0]
    else:
        csv_path = root
    base = csv_path.parent
    parsed = Parsed(image_root=base)
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if "path" not in columns or "age" not in columns:
            raise AgecliError(f"{csv_path}: header must name at least `path` and `age` "
                              f"(path,age[,gender][,split][,group]); got {','.join(columns) or 'nothing'}.")
        for lineno, raw in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
            parsed.rows += 1
            where = f"{csv_path.name}:{lineno}"
            rel = safe_relpath(row.get("path", ""))
            if rel is None:
                parsed.rejects.append(Reject(where, "unsafe_path" if row.get("path") else "malformed_row",
                                             row.get("path", "")))
                continue
            age = math.nan
            if row.get("age"):
                if not _is_float(row["age"]) or not 0 <= float(row["age"]) <= MAX_LABEL_AGE:
                    parsed.rejects.append(Reject(rel, "label_out_of_range", f"age {row['age']!r}"))
                    continue
                age = float(row["age"])
            gender_text = row.get("gender", "").lower()
            gender = GENDER_CODES.get(gender_text, {"0": 0, "1": 1}.get(gender_text, UNKNOWN))
            if gender_text and gender == UNKNOWN and gender_text != "u":
                parsed.rejects.append(Reject(rel, "label_out_of_range", f"gender {gender_text!r}"))
                continue
            split = _SPLIT_NAMES.get(row.get("split", "").lower(), "")
            if row.get("split") and not split:
                parsed.rejects.append(Reject(rel, "bad_split", row["split"]))
                continue
            group = group_of_age(age) if not math.isnan(age) else UNKNOWN
            if row.get("group"):
                if not row["group"].isdigit() or int(row["group"]) >= len(ADIENCE_GROUPS):
                    parsed.rejects.append(Reject(rel, "label_out_of_range", f"group {row['group']!r}"))
                    continue
                group = int(row["group"])
                if math.isnan(age):
                    age = group_midpoint(group)
            if math.isnan(age):
                parsed.rejects.append(Reject(rel, "age_missing"))
                continue
            if not (base / rel).is_file():
                parsed.missing.append(rel)
                continue
            parsed.samples.append(Sample(path=rel, age=age, gender=gender, group=group, split=split))
    if strict and parsed.missing:
        raise AgecliError(f"{csv_path}: {len(parsed.missing)} listed images are absent (first: "
                          f"{parsed.missing[0]}); drop --strict to prepare the ones present.")
    return parsed


# --------------------------------------------------------------------------- registry
register(DatasetSpec("adience", "Adience benchmark: fold_*_data.txt + faces/ crops; 8 age groups, 5 folds",
                     _parse_adience, protocol="folds", label_space="group",
                     min_face_fraction=0.2, crop_centred=True))
register(DatasetSpec("utkface", "UTKFace aligned & cropped chips, labels in the file names",
                     _parse_utkface, protocol="holdout", label_space="age", default_detector="none",
                     native_template="utkface_chip", min_face_fraction=0.3, pad_fraction=0.3))
register(DatasetSpec("fgnet", "FG-NET ageing database, 001A02.JPG names; leave-one-person-out",
                     _parse_fgnet, protocol="loso", label_space="age", min_face_fraction=0.1))
register(DatasetSpec("lap2016", "ChaLearn LAP 2016 apparent age: *_gt.csv (image,mean,stdv)",
                     _parse_lap2016, protocol="official", label_space="apparent_age", min_face_fraction=0.05))
register(DatasetSpec("folder", "unlabelled photos, any nesting; every face is stored",
                     _parse_folder, protocol="holdout", label_space="none", min_face_fraction=0.05,
                     all_faces=True))
register(DatasetSpec("csv", "any images listed in a CSV: path,age[,gender][,split][,group]",
                     _parse_csv, protocol="holdout", label_space="age", min_face_fraction=0.05))
