"""Is the data pipeline the bottleneck of training?

Measures, in one process and on the same model, optimizer and input size:

    pipeline   images/s of real training steps fed by the face store: Batches (memory map +
               background prefetch) -> to_input (resize + augmentation + normalisation on tensors)
    in-memory  images/s of the same training steps on one pre-made input tensor

and reports ratio = pipeline / in-memory (aim >= 0.9). Uses real UTKFace faces from
../shared/data when present (loaded into a temporary face store), else synthetic images.
Timing: warm-up steps first, CUDA synchronised, median of per-round rates.

    python benchmarks/train_throughput.py --arch mobilenet --size 64 --device cpu --threads 1
    python benchmarks/train_throughput.py --arch resnet50 --size 224 --device cuda --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "utkface" / "UTKFace"


def make_store(tmp: Path, n: int, size: int):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_store, synthetic_faces, utkface_faces  # the test fixture builders

    if SHARED.is_dir():
        images, records, source = *utkface_faces(n, size), f"UTKFace ({n} real faces)"
    else:
        images, records = synthetic_faces(n, size)
        source = f"synthetic ({n} images; ../shared/data absent)"
    records["split"] = "train"
    return build_store(tmp / "run", images, records), source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mobilenet")
    parser.add_argument("--size", type=int, default=64, help="model input side")
    parser.add_argument("--store-size", type=int, default=96, help="side of the faces in the store")
    parser.add_argument("--faces", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workers", type=int, default=3, help="prefetch depth of Batches")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from agecli.modeling.checkpoint import ModelSpec
    from agecli.data.batches import Augment, Batches, to_input
    from agecli.modeling.encodings import build_encoding
    from agecli.modeling.backbones import build_model
    from agecli.store import FaceStore
    from agecli.engine.loop import default_loss, to_device as _to_device
    from agecli.engine.optim import make_optimizer
    from agecli.options import TrainOptions

    device = args.device
    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        run, source = make_store(Path(tmp), args.faces, args.store_size)
        store = FaceStore.open(run)
        enc = build_encoding("ldae")
        torch.manual_seed(0)
        model = build_model(args.arch, enc).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        spec = ModelSpec(arch=args.arch, encoding=enc.to_dict(), input_size=args.size)
        optimizer = make_optimizer(model, TrainOptions())
        loss_fn = default_loss(enc, False)
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
        generator = torch.Generator().manual_seed(0)
        model.train()

        def step(x, batch) -> None:
            with amp:
                loss, _ = loss_fn(model(x), batch, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()

        batches = Batches(store, store.indices("train"), args.batch_size, shuffle=True, drop_last=True,
                          prefetch=args.workers)
        if len(batches) < args.steps:
            raise SystemExit(f"{len(batches)} batches per epoch < --steps {args.steps}; use more --faces")

        def pipeline_batches():
            epoch = 0
            while True:
                batches.set_epoch(epoch)
                yield from batches
                epoch += 1

        fixed = next(iter(batches))
        fixed_dev = _to_device(fixed, device)
        x_fixed = to_input(fixed.images, args.size, spec.mean, spec.std, device=device, augment=Augment(),
                           generator=generator, channels_last=cuda)

        def rates_in_memory() -> list[float]:
            for _ in range(args.warmup):
                step(x_fixed, fixed_dev)
            out = []
            for _ in range(args.rounds):
                sync()
                t = time.perf_counter()
                for _ in range(args.steps):
                    step(x_fixed, fixed_dev)
                sync()
                out.append(args.steps * args.batch_size / (time.perf_counter() - t))
            return out

        def rates_pipeline() -> list[float]:
            stream = pipeline_batches()
            for _ in range(args.warmup):
                b = _to_device(next(stream), device)
                step(to_input(b.images, args.size, spec.mean, spec.std, device=device, augment=Augment(),
                              generator=generator, channels_last=cuda), b)
            out = []
            for _ in range(args.rounds):
                sync()
                t = time.perf_counter()
                for _ in range(args.steps):
                    b = _to_device(next(stream), device)
                    x = to_input(b.images, args.size, spec.mean, spec.std, device=device, augment=Augment(),
                                 generator=generator, channels_last=cuda)
                    step(x, b)
                sync()
                out.append(args.steps * args.batch_size / (time.perf_counter() - t))
            return out

        # interleave the two measurements so a noisy neighbour on a shared CPU hits both alike
        mem, pipe = [], []
        for _ in range(2):
            mem += rates_in_memory()
            pipe += rates_pipeline()

    result = {
        "benchmark": "train_throughput",
        "arch": args.arch, "input_size": args.size, "store_size": args.store_size, "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(), "prefetch": args.workers, "data": source,
        "in_memory_images_per_s": statistics.median(mem),
        "pipeline_images_per_s": statistics.median(pipe),
        "rounds": {"in_memory": mem, "pipeline": pipe},
        "torch": torch.__version__, "python": platform.python_version(),
    }
    result["ratio"] = result["pipeline_images_per_s"] / result["in_memory_images_per_s"]
    print(f"{args.arch} @ {args.size}px, batch {args.batch_size}, {result['device']}, "
          f"{result['torch_threads']} threads, data: {source}")
    print(f"  in-memory tensors : {result['in_memory_images_per_s']:8.1f} images/s")
    print(f"  face-store pipeline: {result['pipeline_images_per_s']:8.1f} images/s")
    print(f"  ratio              : {result['ratio']:.3f}  (aim >= 0.9)")
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"train_throughput_{args.arch}_{args.size}_{'cuda' if cuda else 'cpu'}.json"
    from agecli.rundir import write_json

    write_json(args.out / name, result)
    print(f"  -> {args.out / name}")


if __name__ == "__main__":
    main()
