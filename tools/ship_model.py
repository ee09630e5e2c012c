"""Copy a trained checkpoint to where agecli ships its default model, naming no machine path.

    python tools/ship_model.py RUN/distill/NAME/best.pt --run RUN --as runs/utkface_facerec

A checkpoint's provenance records the run it was trained in and its teachers' files by the
paths they were given, which for a run outside the repository are absolute paths of the
machine that trained it. The shipped file must not carry those: every path under RUN is
rewritten as under the name given by --as (the recipe's own run folder), and any other
absolute path left in the provenance is refused. Weights, the record of the faces it learned
from and every figure are kept as they are. The copy is written atomically to
agecli/weights/default.pt (or --out); its MODEL_CARD.md is not touched: update it by hand
from `agecli eval --model default`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from agecli.modeling.checkpoint import read_checkpoint
from agecli.modeling.zoo import DEFAULT_MODEL_FILE
from agecli.rundir import atomic_path


def relocate(value, old: str, new: str):
    """`value` (nested dicts, lists, strings) with the prefix `old` of every path replaced by `new`."""
    if isinstance(value, dict):
        return {key: relocate(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [relocate(item, old, new) for item in value]
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old):]
    return value


def absolute_paths(spec: dict) -> list[str]:
    """Absolute paths still named anywhere in a checkpoint's spec."""
    return sorted(set(re.findall(r'"(/[^"]+)"', json.dumps(spec))))


def ship(source: Path, run: Path, name: str, out: Path) -> list[str]:
    """Write the relocated copy of `source` to `out`; the paths that were rewritten."""
    payload = read_checkpoint(source)
    old = str(run.resolve())
    before = json.dumps(payload["spec"])
    payload["spec"] = relocate(payload["spec"], old, name.rstrip("/"))
    left = absolute_paths(payload["spec"])
    if left:
        raise SystemExit(f"{source}: absolute paths outside {old} remain in its provenance: {left}; "
                         "give the folder that holds them with --run.")
    with atomic_path(out) as tmp:
        torch.save(payload, tmp)
    return sorted(set(re.findall(rf'"({re.escape(old)}[^"]*)"', before)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--run", type=Path, required=True, help="the run folder the checkpoint was trained in")
    parser.add_argument("--as", dest="name", default="runs/utkface_facerec",
                        help="the name its paths get instead (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_FILE)
    args = parser.parse_args()
    rewritten = ship(args.checkpoint, args.run, args.name, args.out)
    print(f"wrote {args.out}; {len(rewritten)} path(s) under {args.run} now under {args.name}")


if __name__ == "__main__":
    sys.exit(main())
