"""How far the exact output moves when only the feature maps are rounded to bf16 (what a bf16 tensor-core
kernel does to its dot operands), everything else in float64. Where this floor is above the tolerance, no
bf16 kernel can meet it at those inputs: the check is ill-conditioned there, not the kernel wrong.

    python -m benchmarks.feature_rounding --mixer rfa --shape 4,2048,16,64,64 [--shape ...] [--out FILE]

Inputs as benchmarks/gpu_check.py draws them for its forward check (bf16, seed 0, natural Params).
"""
from __future__ import annotations

import argparse
import importlib
import json

import torch

import mixforge as mf
from mixforge.spec.shapes import REFERENCE_DTYPES, resolve_call
from mixforge.spec.testing import random_inputs

ref = importlib.import_module("mixforge.spec.reference")   # the module (mixforge.spec.reference is also a function)


def floors(mixer, B, T, H, K, V, seed=0) -> dict:
    x = {n: t.double() for n, t in random_inputs(mixer, B=B, T=T, H=H, K=K, V=V, dtype=torch.bfloat16, seed=seed,
                                                  natural=True).items()}
    shapes = resolve_call(mixer, x, dtypes=REFERENCE_DTYPES)
    maps = ref.evaluate_maps(mixer, x, shapes)
    S0, z0 = ref._split_state(mixer, None, shapes.N, H, K, V, torch.float64, shapes.device)

    def out(q, k):
        return ref._scan(mixer, q, k, maps.v, maps.gamma, S0, z0, maps.scale)[0]

    exact = out(maps.q, maps.k)
    bf = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    rel = lambda o: ((o - exact).norm() / exact.norm()).item()  # noqa: E731
    return {"q_and_k_rounded": rel(out(bf(maps.q), bf(maps.k))), "k_rounded": rel(out(maps.q, bf(maps.k)))}


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
