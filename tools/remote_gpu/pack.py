"""Pack a prepared store (RUN/prepare) into WebP bytes small enough to travel to a GPU machine.

    python tools/remote_gpu/pack.py runs/utkface/prepare .gpu/utk 85     # quality 85: 38 MiB for UTKFace
"""
import sys, shutil, numpy as np, cv2
from concurrent.futures import ThreadPoolExecutor
src, dst, q = sys.argv[1], sys.argv[2], int(sys.argv[3])
import os; os.makedirs(dst, exist_ok=True)
faces = np.load(f"{src}/faces.npy", mmap_mode="r")
def enc(i):
    ok, buf = cv2.imencode(".webp", np.ascontiguousarray(faces[i][:, :, ::-1]), [cv2.IMWRITE_WEBP_QUALITY, q])
    assert ok
    return buf.tobytes()
with ThreadPoolExecutor(2) as ex:
    blobs = list(ex.map(enc, range(len(faces))))
offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
open(f"{dst}/faces.webp.bin", "wb").write(b"".join(blobs))
np.save(f"{dst}/offsets.npy", offsets)
np.save(f"{dst}/shape.npy", np.array(faces.shape))
for name in ("records.csv", "manifest.json", "missing.txt", "rejects.csv"):
    shutil.copy(f"{src}/{name}", f"{dst}/{name}")
print(len(blobs), offsets[-1] / 2**20, "MiB")
