"""The chunked backward in key blocks against all of K in one tile, on the GPU, in one call.

    python -m benchmarks.keyblock_bench --out DIR [--cases gla,mamba2] [--shape 8,4096,16,256,256]
           [--configs 32,64,8,1,0 32,64,8,1,128 ...]
    TRITON_INTERPRET=1 python -m benchmarks.keyblock_bench --smoke     # the CPU interpreter, tiny shapes

At K = V = 256 every decaying mixer's fwd+bwd took about twice its peer's time (gla 33.4 against 16.6 ms,
compare-20261122-170124): chunk_bwd_kernel held whole [chunk, 256] tiles and spilled at every config (gla:
1496 bytes a thread, chunk_compile-20261122-k256.log). With key blocks (config.BK < K) it walks the keys a
block at a time. A config is chunk,BV,num_warps,num_stages,BK[,t] (BK 0: all of K; t: two-pass forward); it
is the backward's only (the forward keeps the heuristic's), or with --kernel chunk_fwd the forward's, timed
alone (there BK splits the states walk and, two-pass, the output kernel: chunk_out_kernel). Every config is timed fwd+bwd (median), its gradients compared with the first
config's, and its kernels profiled. Writes keyblock_bench-<stamp>.json with device, versions and date.
"""
from __future__ import annotations

import argparse
import time

import torch

CONFIGS = ["32,64,8,1,0", "32,64,8,1,128", "32,64,4,1,128", "64,64,8,1,128", "32,64,8,1,64", "64,64,8,1,64",
           "32,128,8,1,128", "32,64,8,2,128"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--cases", default="gla,hgrn2,rwkv6,scalar_decay,mamba2", help="cases of benchmarks.compare")
    ap.add_argument("--shape", default="8,4096,16,256,256", help="B,T,H,K,V")
    ap.add_argument("--configs", nargs="*", default=CONFIGS)
    ap.add_argument("--kernel", default="chunk_bwd", choices=("chunk_bwd", "chunk_fwd"),
                    help="the kernel whose config is pinned; chunk_fwd times the forward alone (a config's BK "
                         "then splits the two-pass forward's states walk and outputs: chunk,BV,w,s,BK,t)")
    ap.add_argument("--no-keys-pass", action="store_true",
                    help="the split states walks compute their decayed keys at every step instead of reading the "
                         "keys pass's (codegen.chunk.walk_keys off): what the keys pass is worth at this shape")
    ap.add_argument("--no-factors", action="store_true",
                    help="a walk that reads a pass reads the decayed keys, never only the decay factors "
                         "(codegen.chunk.walk_factors off)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the interpreter: every step runs")
    ap.add_argument("--compile-only", action="store_true",
                    help="one fwd+bwd per config, untimed: run one process per case side by side first, and the "
                         "timed run finds every kernel compiled")
    args = ap.parse_args(argv)
    from benchmarks.chunk_bench import factors_pass_off, keys_pass_off
    with keys_pass_off(args.no_keys_pass), factors_pass_off(args.no_factors):
        return _run(args)


def _run(args) -> int:
    import mixforge as mf
    from benchmarks.chunk_bench import cfg_of, rel
    from benchmarks.compare import CASES, kernel_profile, on_pass, peak_mem
    from benchmarks.runinfo import Results, timer
    from mixforge.spec.testing import random_inputs

    dev = "cpu" if args.smoke else "cuda"

    bench = timer(args.smoke)
    B, T, H, K, V = (1, 40, 2, 40, 24) if args.smoke else (int(p) for p in args.shape.split(","))
    configs = ["16,16,4,1,0", "16,16,4,1,16", "16,16,4,1,16,t"] if args.smoke else args.configs
    dtype = torch.float32 if args.smoke else torch.bfloat16
    cases = {c.name: c for c in CASES}
    res = Results(args.out, "keyblock_bench", gpu=not args.smoke, shape=dict(B=B, T=T, H=H, K=K, V=V, dtype=str(dtype)),
                  kernel=args.kernel, keys_pass_off=args.no_keys_pass,   # else codegen.chunk.walk_keys decides
                  factors_off=args.no_factors)                           # else walk_factors does

    for name in args.cases.split(","):
        case = cases[name]
        x = random_inputs(case.mixer, B=B, T=T, H=H, K=K, V=V, G=case.G, dtype=dtype, device=dev, seed=0)
        for n in ("q", "k", "C", "B"):   # moderate logits at large K, as benchmarks.compare
            if n in x:
                x[n] = (x[n].float() * 0.5).to(dtype)
        leaves = list(x.values())
        dy = None
        first = None
        for c in configs:
            cfg = cfg_of(c)
            ops = mf.compile(case.mixer, config_lookup=lambda m, sk, cfg=cfg: cfg if sk.kernel == args.kernel else None)
            run = lambda ops=ops: ops.chunk(**x)[0]  # noqa: E731
            row = dict(case=name, config=c)
            t0 = time.time()
            try:
                for t in leaves:
                    t.requires_grad_(True)
                    t.grad = None
                y = run()
                dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dev, y.dtype) if dy is None else dy
                g = torch.autograd.grad(y, leaves, dy)
                if first is None:
                    first = (y.detach(), g)
                row["rel_y"] = rel(y.detach(), first[0])
                row["rel_grads"] = {n: rel(a, b) for n, a, b in zip(x, g, first[1])}
                row["compile_s"] = round(time.time() - t0, 2)
                p = "fwd" if args.kernel == "chunk_fwd" else "fwd+bwd"
                if not args.compile_only:
                    row[f"{p}_ms"] = on_pass(run, leaves, p, bench)
                if not (args.smoke or args.compile_only):
                    row[f"{p}_peak_bytes"] = on_pass(run, leaves, p, peak_mem)
                    row["profile"] = on_pass(run, leaves, p, kernel_profile)[:8]
            except Exception as e:   # a config the machine refuses is a row, not the end of the run
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            for t in leaves:
                t.requires_grad_(False)
                t.grad = None
            res.add(row, hide=("profile",))
    print(f"wrote {res.path}")
    bad = [r for r in res.rows if "error" in r or not max([r["rel_y"], *r["rel_grads"].values()]) < 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
