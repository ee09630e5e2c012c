"""Fail in seconds, not minutes: everything the GPU recipe needs is importable and runs on CUDA."""
import time, torch
from agecli.modeling.dlib_resnet import dlib_age_onnx
from agecli.modeling.encodings import build_encoding
from agecli.modeling.backbones import build_model
print("dlib onnx:", dlib_age_onnx())
device = "cuda" if torch.cuda.is_available() else "cpu"
print("torch", torch.__version__, "device", device, torch.cuda.get_device_name() if device == "cuda" else "")
enc = build_encoding("ldae")
for arch, size, pre in (("dlib_resnet10", 128, "dlib"), ("mobilenet_v3_small", 64, None)):
    m = build_model(arch, enc, gender=True, pretrained=pre).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    x = torch.rand(128, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    for i in range(8):
        if i == 3:
            (torch.cuda.synchronize() if device == "cuda" else None); t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = m(x)["age"].float().logsumexp(1).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    (torch.cuda.synchronize() if device == "cuda" else None)
    print(f"{arch} @{size}: {(time.perf_counter() - t) / 5 * 1000:.1f} ms per step of 128")
