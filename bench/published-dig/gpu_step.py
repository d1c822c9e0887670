"""Times one sampler step of the published DiG network on a device: the
network call the published sampler makes per step (`MainModel.forward_step`,
inference, no gradients), for the rows of `digctl gpu-check`'s speed table.

    python3 gpu_step.py --device cuda --lengths 128,256,512 --batches 1,8

Prints one JSON object per (length, batch): seconds per step and per sample
per step (the median of --steps timed calls after --warmup, synchronised).
The published architecture's sizes are MainModel's defaults (d_model 768,
d_pair 256, 12 layers, 32 heads, feed-forward 1024), random weights.
"""
import argparse
import json
import os
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lengths", default="128,256,512")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tf32", action="store_true")
    a = ap.parse_args()

    import torch

    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.allow_tf32 = a.tf32
    # forward_step uses no SO(3) tables; the module computes them at import
    # (minutes), so a stand-in takes its place.
    sys.modules["model.so3"] = types.ModuleType("model.so3")
    from model.main_model import MainModel

    dev = torch.device(a.device)
    torch.manual_seed(0)
    m = MainModel().to(dev).eval()
    params = sum(p.numel() for p in m.parameters())
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for L in [int(x) for x in a.lengths.split(",")]:
        for B in [int(x) for x in a.batches.split(",")]:
            single = torch.randn(B, L, 384, device=dev)
            pair = torch.randn(B, L, L, 128, device=dev)
            T = torch.randn(B, L, 3, device=dev) * 10.0
            IR = torch.linalg.qr(torch.randn(B, L, 3, 3, device=dev))[0]
            mask = torch.zeros(B, L, dtype=torch.bool, device=dev)
            step = torch.full((B,), 250, device=dev)
            times = []
            try:
                with torch.no_grad():
                    for i in range(a.warmup + a.steps):
                        sync()
                        t0 = time.perf_counter()
                        m.forward_step((T, IR), mask, step, single, pair)
                        sync()
                        if i >= a.warmup:
                            times.append(time.perf_counter() - t0)
            except torch.cuda.OutOfMemoryError:
                print(json.dumps({"length": L, "batch": B, "error": "out of memory"}), flush=True)
                torch.cuda.empty_cache()
                continue
            times.sort()
            med = times[len(times) // 2]
            print(
                json.dumps(
                    {
                        "length": L,
                        "batch": B,
                        "seconds_per_step": med,
                        "seconds_per_sample_step": med / B,
                        "parameters": params,
                        "tf32": a.tf32,
                        "torch": torch.__version__,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
