"""Write into an agecli checkpoint made before checkpoints recorded it which faces it learned
from: the training split of the run it was trained on, prepared again.

    python tools/record_seen_faces.py MODEL.pt RUN [--out OUT.pt]

RUN must hold the same prepared faces as the model's training run (the data fingerprints
must match; `agecli prepare` with the same dataset, options and seed reproduces them). The
model's training split is taken as what it learned from, which holds for models trained or
distilled on one run at --labelled-fraction 1 whose teachers were trained on that split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from agecli.modeling.checkpoint import ModelSpec, read_checkpoint
from agecli.rundir import atomic_path
from agecli.store import FaceStore, face_keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, help="where to write (default: over MODEL)")
    args = parser.parse_args(argv)
    payload = read_checkpoint(args.model)
    spec = ModelSpec.from_dict(payload["spec"], str(args.model))
    store = FaceStore.open(args.run)
    if spec.data_fingerprint != store.fingerprint():
        print(f"{args.run} holds other faces than {args.model} was trained on "
              f"({store.fingerprint()} vs {spec.data_fingerprint}); prepare it as the model's run was.", file=sys.stderr)
        return 1
    fraction = (spec.provenance.get("args") or {}).get("options", {}).get("labelled_fraction", 1.0)
    if fraction != 1.0 or (spec.provenance.get("args") or {}).get("unlabelled"):
        print(f"{args.model} learned from more or other faces than its run's train split; not written.", file=sys.stderr)
        return 1
    keys = face_keys(store.records, store.indices("train"))
    payload["seen_faces"] = torch.from_numpy(keys)
    with atomic_path(args.out or args.model) as tmp:
        torch.save(payload, tmp)
    print(f"{args.out or args.model}: {len(keys)} faces recorded as learned from")
    return 0


if __name__ == "__main__":
    sys.exit(main())
