"""Times the published DiG training update (see README.md).

Prints one JSON object: {"seconds": [per timed update], "parameters": N, ...}.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, required=True)
    ap.add_argument("--d-pair", type=int, required=True)
    ap.add_argument("--n-layer", type=int, required=True)
    ap.add_argument("--n-heads", type=int, required=True)
    ap.add_argument("--dim-feedforward", type=int, required=True)
    ap.add_argument("--length", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args()
    if a.batch_size % 2:
        sys.exit("the published loss draws time steps in pairs: --batch-size must be even")

    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    from scipy.spatial.transform import Rotation

    from model.main_model import MainModel
    from model.structure_module import StructureModule

    m = MainModel(d_model=a.d_model, d_pair=a.d_pair, n_layer=a.n_layer, n_heads=a.n_heads)
    # MainModel fixes the feed-forward width at 1024; the native sizes name theirs.
    m.st_module = StructureModule(
        d_pair=a.d_pair,
        n_layer=a.n_layer,
        d_model=a.d_model,
        n_head=a.n_heads,
        dim_feedforward=a.dim_feedforward,
        dropout=0.1,
    )
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    B, L = a.batch_size, a.length
    data = {
        "single_repr": torch.randn(B, L, 384),
        "pair_repr": torch.randn(B, L, L, 128),
        "T": torch.randn(B, L, 3) * 10.0,
        "IR": torch.tensor(
            Rotation.random(B * L, random_state=0).as_matrix(), dtype=torch.float32
        ).view(B, L, 3, 3),
    }
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        out = m(data, compute_loss=True)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
    print(
        json.dumps(
            {
                "seconds": times,
                "parameters": sum(p.numel() for p in m.parameters()),
                "loss": float(out["loss"]),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
