"""How far the exact output moves when only the feature maps are rounded to bf16 (what a bf16 tensor-core
kernel does to its dot operands), everything else in float64. Where this floor is above the tolerance, no
bf16 kernel can meet it at those inputs: the check is ill-conditioned there, not the kernel wrong.

    python -m benchmarks.feature_rounding --mixer rfa --shape 4,2048,16,64,64 [--shape ...] [--out FILE]

Inputs as benchmarks/gpu_check.py draws them for its forward check (bf16, seed 0, natural Params).
"""
from __future__ import annotations

import argparse
import json

import torch

import mixforge as mf
from mixforge.spec.reference import recurrence
from mixforge.spec.testing import random_inputs


def floors(mixer, B, T, H, K, V, seed=0) -> dict:
    x = {n: t.double() for n, t in random_inputs(mixer, B=B, T=T, H=H, K=K, V=V, dtype=torch.bfloat16, seed=seed,
                                                  natural=True).items()}
    with torch.no_grad():
        exact = recurrence(mixer, **x).y
        held = recurrence(mixer, round_features=torch.bfloat16, **x).y
    return {"q_and_k_rounded": ((held - exact).norm() / exact.norm()).item()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixer", default="rfa")
    p.add_argument("--shape", action="append", default=None, help="B,T,H,K,V (repeatable)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    mixer = mf.load_mixer(a.mixer)
    rows = []
    for s in a.shape or ["4,2048,16,64,64"]:
        B, T, H, K, V = (int(v) for v in s.split(","))
        row = {"mixer": mixer.name, "shape": [B, T, H, K, V], **floors(mixer, B, T, H, K, V)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"torch": torch.__version__, "device": "cpu", "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
