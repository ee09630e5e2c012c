"""Bring a run's models and records back from a remote machine in parts of at most 15 MiB (8 files at most)."""
import io, sys, tarfile
from pathlib import Path
run, out = Path(sys.argv[1]), Path(sys.argv[2])
LIMIT = 15 * 2**20
skip = {"last.pt", "faces.npy", "faces.npy.part"}
items = []
for path in sorted(run.rglob("*")):
    if not path.is_file() or path.name in skip or "teacher_cache" in path.parts or "prepare" in path.parts:
        continue
    items.append(path)
bins, sizes = [[]], [0]
for path in sorted(items, key=lambda p: -p.stat().st_size):
    size = path.stat().st_size
    for i, s in enumerate(sizes):
        if s + size <= LIMIT:
            bins[i].append(path); sizes[i] += size; break
    else:
        bins.append([path]); sizes.append(size)
for i, files in enumerate(bins):
    with tarfile.open(out / f"part{i}.tar", "w") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(run.parent)))
    print(f"part{i}.tar: {len(files)} files, {sizes[i] / 2**20:.1f} MiB")
