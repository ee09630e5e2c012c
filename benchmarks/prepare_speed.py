"""Faces per second of `agecli prepare` against a plain per-image loop over facenet-pytorch's
`MTCNN.detect`, on the same images in the same run.

    python benchmarks/prepare_speed.py [--utkface 64] [--repeat 1]

Data: ../shared/data/photos (group photos, every face) and a UTKFace subset (with MTCNN,
not --detector none, so both sides detect). Writes benchmarks/results/prepare_speed.json.
The baseline uses torch's default threads in one process; prepare uses its defaults
(worker processes, one thread each). Neither side's start-up is excluded except the
baseline's one-off MTCNN construction (prepare pays for spawning its workers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


def baseline(paths: list[Path]) -> tuple[int, float]:
    import numpy as np
    from facenet_pytorch import MTCNN
    from PIL import Image

    mtcnn = MTCNN(keep_all=True, device="cpu")
    mtcnn.detect(np.zeros((160, 160, 3), np.uint8))  # warm-up
    start = time.perf_counter()
    faces = 0
    for path in paths:
        image = Image.open(path).convert("RGB")
        boxes, probs = mtcnn.detect(image)
        faces += 0 if boxes is None else int(sum(p >= 0.9 for p in probs))
    return faces, time.perf_counter() - start


def ours(dataset: str, root: Path, limit: int | None) -> tuple[int, float, dict]:
    from agecli.stages.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        res = prepare(dataset, root, Path(tmp) / "run", detector="mtcnn", limit=limit)
        return res["faces_stored"], time.perf_counter() - start, res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utkface", type=int, default=64, help="UTKFace chips to use (0 = skip)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side; the median is reported")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found: the benchmark needs ../shared/data beside the repository.")
    import torch

    from agecli.data.datasets import get_dataset

    cases = [("photos", "folder", SHARED / "photos", None)]
    if args.utkface:
        cases.append(("utkface", "utkface", SHARED / "utkface" / "UTKFace", args.utkface))
    rows = []
    for label, dataset, root, limit in cases:
        parsed = get_dataset(dataset).parse(root)
        paths = [parsed.image_root / s.path for s in parsed.samples[:limit]]
        base = [baseline(paths) for _ in range(args.repeat)]
        mine = [ours(dataset, root, limit) for _ in range(args.repeat)]
        b_time = statistics.median(t for _, t in base)
        o_time = statistics.median(t for _, t, _ in mine)
        row = dict(case=label, images=len(paths), baseline_faces=base[0][0], baseline_s=round(b_time, 2),
                   baseline_faces_per_s=round(base[0][0] / b_time, 2), prepare_faces=mine[0][0],
                   prepare_s=round(o_time, 2), prepare_faces_per_s=round(mine[0][0] / o_time, 2),
                   speedup=round((mine[0][0] / o_time) / (base[0][0] / b_time), 2) if base[0][0] else None,
                   workers=mine[0][2].get("workers"))
        rows.append(row)
        print(f"{label:8s} {len(paths):4d} images | baseline {row['baseline_faces']:4d} faces "
              f"{row['baseline_s']:7.2f} s {row['baseline_faces_per_s']:7.2f} f/s | prepare "
              f"{row['prepare_faces']:4d} faces {row['prepare_s']:7.2f} s {row['prepare_faces_per_s']:7.2f} f/s"
              f" | x{row['speedup']}")
    out = dict(rows=rows, machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(),
                                       torch=torch.__version__, torch_threads=torch.get_num_threads(),
                                       load_avg=os.getloadavg()), repeat=args.repeat)
    path = REPO / "benchmarks" / "results" / "prepare_speed.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
