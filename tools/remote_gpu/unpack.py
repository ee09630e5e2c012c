"""Decode a WebP pack (pack.py) into RUN/prepare/faces.npy next to the original records and manifest,
so the run has the same split and the same data fingerprint.

    python tools/remote_gpu/unpack.py .gpu/utk runs/utkface_gpu
"""
import sys, os, shutil, numpy as np, cv2
from concurrent.futures import ThreadPoolExecutor
src, run = sys.argv[1], sys.argv[2]
out = f"{run}/prepare"; os.makedirs(out, exist_ok=True)
data = np.fromfile(f"{src}/faces.webp.bin", dtype=np.uint8)
off = np.load(f"{src}/offsets.npy"); shape = tuple(int(v) for v in np.load(f"{src}/shape.npy"))
faces = np.lib.format.open_memmap(f"{out}/faces.npy.part", mode="w+", dtype=np.uint8, shape=shape)
def dec(i):
    faces[i] = cv2.imdecode(data[off[i]:off[i + 1]], cv2.IMREAD_COLOR)[:, :, ::-1]
with ThreadPoolExecutor(16) as ex:
    list(ex.map(dec, range(shape[0])))
faces.flush(); del faces
os.replace(f"{out}/faces.npy.part", f"{out}/faces.npy")
for name in ("records.csv", "missing.txt", "rejects.csv", "manifest.json"):
    shutil.copy(f"{src}/{name}", f"{out}/{name}")
print("unpacked", shape)
