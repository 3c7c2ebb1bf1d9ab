"""The recurrent path's launch space on the GPU, against FLA's fused_recurrent_gla in the same run.

    python -m benchmarks.recurrent_bench --out DIR [--shape 16,2048,16,128,128] [--configs 16,1,1 32,2,1 ...]
    TRITON_INTERPRET=1 python -m benchmarks.recurrent_bench --smoke     # the CPU interpreter, tiny shapes

The compare's recurrent rows (B = 16, T = 2048, H = 16, K = V = 128, bf16) have gla at 3x FLA's time with the
heuristic launch (BV 64, 4 warps, 2 stages) and nothing tuned. Each program walks T tokens one after another,
so its time per token is latency: the loads of a token's rows, the state update and two reductions (q . S
over K, and the bonus q . k). The value block (programs per head), the warps (how far the reductions cross
warps) and the stages (whether the next token's rows load ahead) move that latency. A config is
BV,num_warps,num_stages. Every config is timed forward and forward plus backward (the same config runs both
kernels), its outputs and gradients compared with the first config's, and the heuristic's and the peer's
kernels are profiled. Writes recurrent_bench-<stamp>.json with device, versions and date.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

CONFIGS = ["64,4,2", "16,1,1", "16,1,3", "16,2,1", "32,1,1", "32,2,1", "32,4,1", "32,4,3", "64,2,1", "64,4,1",
           "64,4,3", "64,8,1", "128,4,1", "128,8,1"]


def cfg_of(s: str):
    from mixforge.codegen.config import KernelConfig
    bv, w, st = (int(p) for p in s.split(","))
    return KernelConfig(chunk=16, sub_chunk=8, BV=bv, num_warps=w, num_stages=st)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shape", default="16,2048,16,128,128", help="B,T,H,K,V")
    ap.add_argument("--configs", nargs="*", default=CONFIGS)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the interpreter: every step runs")
    args = ap.parse_args(argv)

    import mixforge as mf
    from benchmarks.runinfo import Results, timer
    from benchmarks.chunk_bench import rel
    from benchmarks.compare import GLA_CORE, kernel_profile, on_pass, peer_fused_recurrent_gla, peak_mem
    from mixforge.spec.reference import default_scale
    from mixforge.spec.testing import random_inputs

    dev = "cpu" if args.smoke else "cuda"

    bench = timer(args.smoke)
    B, T, H, K, V = (1, 20, 2, 16, 16) if args.smoke else (int(p) for p in args.shape.split(","))
    configs = [c.replace("128", "16").replace("64", "16").replace("32", "16") for c in args.configs] \
        if args.smoke else args.configs
    dtype = torch.float32 if args.smoke else torch.bfloat16
    x = random_inputs(GLA_CORE, B=B, T=T, H=H, K=K, V=V, G=1, dtype=dtype, device=dev, seed=0)
    for n in ("q", "k"):   # moderate logits at K = 128, as benchmarks.compare
        x[n] = (x[n].float() * 0.5).to(dtype)
    leaves = list(x.values())
    ops = mf.compile(GLA_CORE)
    res = Results(args.out, "recurrent_bench", gpu=not args.smoke, shape=dict(B=B, T=T, H=H, K=K, V=V, dtype=str(dtype)))
    info = res.info

    def grads(run):
        for t in leaves:
            t.requires_grad_(True)
            t.grad = None
        y = run()
        y.backward(torch.ones_like(y) * 0.01)
        g = [t.grad.clone() for t in leaves]
        for t in leaves:
            t.requires_grad_(False)
            t.grad = None
        return y.detach(), g

    first = None
    for c in configs:
        cfg = cfg_of(c)
        run = lambda cfg=cfg: ops.recurrent(config=cfg, **x)[0]  # noqa: E731
        row = dict(config=c)
        t0 = time.time()
        try:
            y, g = grads(run)
            if first is None:
                first = (y, g)
            row["rel_y"] = rel(y, first[0])
            row["rel_grads"] = max(rel(a, b) for a, b in zip(g, first[1]))
            row["compile_s"] = round(time.time() - t0, 2)
            for p in ("fwd", "fwd+bwd"):
                row[f"{p}_ms"] = on_pass(run, leaves, p, bench)
            if not args.smoke:
                row["fwd+bwd_peak_bytes"] = on_pass(run, leaves, "fwd+bwd", peak_mem)
        except Exception as e:   # a config the machine refuses is a row, not the end of the run
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        for t in leaves:
            t.requires_grad_(False)
            t.grad = None
        res.add(row)

    if not args.smoke:
        heur = lambda: ops.recurrent(**x)[0]  # noqa: E731
        info["heuristic"] = {p: on_pass(heur, leaves, p, kernel_profile) for p in ("fwd", "fwd+bwd")}
        try:
            opts = {"scale": default_scale(GLA_CORE, K)}
            # its decay built from a inside the call, as ours is (and a fresh graph every call)
            peer = lambda: peer_fused_recurrent_gla(x, opts)()  # noqa: E731
            with torch.no_grad():
                info["peer_agree"] = rel(ops.recurrent(**x)[0], peer())
            info["peer"] = {p: on_pass(peer, leaves, p, bench) for p in ("fwd", "fwd+bwd")}
            info["peer_profile"] = {p: on_pass(peer, leaves, p, kernel_profile) for p in ("fwd", "fwd+bwd")}
        except Exception as e:
            info["peer_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps({k: info.get(k) for k in ("peer", "peer_agree", "peer_error")}), flush=True)
    res.save()
    print(f"wrote {res.path}")
    bad = [r for r in res.rows if "error" in r or not r["rel_y"] < 2e-2 or not r["rel_grads"] < 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
