"""Write into an agecli checkpoint made before checkpoints recorded it what it learned from:
the training split of the run it was trained on, prepared again.

    python tools/record_seen_faces.py MODEL.pt RUN [--out OUT.pt] [--teachers-trained-on-this-split]

RUN must hold the same prepared faces as the model's training run (the data fingerprints
must match; `agecli prepare` with the same dataset, options and seed reproduces them). The
run's train split is recorded as the images and the labels it learned from. That holds only
for a model trained or distilled on one run, without --fold, --init, --unlabelled or a
--labelled-fraction below 1, and whose teachers were trained on that same split: the first
are checked from the checkpoint, the last must be confirmed with
--teachers-trained-on-this-split. A checkpoint that already says what it learned from is
left alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from agecli.errors import AgecliError
from agecli.modeling.checkpoint import ModelSpec, Seen, read_checkpoint
from agecli.rundir import atomic_path
from agecli.store import FaceStore, face_keys


def record(model: Path, run: Path, out: Path | None, teachers_confirmed: bool) -> int:
    """The number of distinct training images recorded; AgecliError when the assumptions fail."""
    payload = read_checkpoint(model)
    if "seen_faces" in payload:
        raise AgecliError(f"{model} already records what it learned from; it is left as it is.")
    spec = ModelSpec.from_dict(payload["spec"], str(model))
    args = spec.provenance.get("args") or {}
    options = args.get("options") or {}
    unusual = {"--fold": args.get("fold"), "--init": args.get("init"), "--unlabelled": args.get("unlabelled"),
               "--labelled-fraction": options.get("labelled_fraction", 1.0) if options.get("labelled_fraction", 1.0) < 1
               else None}
    used = [f"{flag} {value}" for flag, value in unusual.items() if value is not None]
    if used:
        raise AgecliError(f"{model} was trained with {', '.join(used)}: it did not learn from exactly its run's "
                          "train split, so this tool cannot say what it learned from.")
    if spec.provenance.get("teachers") and not teachers_confirmed:
        raise AgecliError(f"{model} was distilled from teachers; what they learned from is recorded only if they were "
                          "trained on this same split. Confirm with --teachers-trained-on-this-split.")
    store = FaceStore.open(run)
    if spec.data_fingerprint != store.fingerprint():
        raise AgecliError(f"{run} holds other faces than {model} was trained on ({store.fingerprint()} vs "
                          f"{spec.data_fingerprint}); prepare it as the model's run was.")
    keys = face_keys(store.records, store.indices("train"))
    seen = Seen.of(keys, keys)
    payload["seen_faces"], payload["seen_labels"] = torch.from_numpy(seen.faces), torch.from_numpy(seen.labels)
    with atomic_path(out or model) as tmp:
        torch.save(payload, tmp)
    return len(seen.faces)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, help="where to write (default: over MODEL)")
    parser.add_argument("--teachers-trained-on-this-split", action="store_true",
                        help="the model's teachers were trained on RUN's train split too")
    args = parser.parse_args(argv)
    try:
        count = record(args.model, args.run, args.out, args.teachers_trained_on_this_split)
    except AgecliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out or args.model}: {count} distinct training images recorded as learned from")
    return 0


if __name__ == "__main__":
    sys.exit(main())
