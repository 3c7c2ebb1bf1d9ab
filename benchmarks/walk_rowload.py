"""Experiment: does mamba2's states walk wait on its per-row dt loads? (benchmarks/NOTES.md, tenth session)

    python -m benchmarks.walk_rowload --out DIR            # GPU: B = 4, T = 8192, H = 16, K = V = 128, bf16
    TRITON_INTERPRET=1 python -m benchmarks.walk_rowload --smoke

mamba2's chunk_states_kernel (all of K, no keys pass) took 749 us at B = 4 against the scalar decay's 376, and its
PTX holds nine synchronous loads of dt where the scalar decay's holds one of its input. This swaps, in the
generated module of the compare's mamba2 only, the walk's dt load ([BT, 1], in the key tile's layout) for a [BT]
vector broadcast after softplus ("vector"), and that plus a load one chunk ahead ("prefetch"), then times the
two-pass forward (64/64/4/2, all of K: the walk without the keys pass) and its kernels against the generated
module. A hand edit of the generated source, for a measurement only; nothing here is used by mixforge.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

OLD_LOAD = "            r26_dt = tl.load(x_dt + r26_row * H + i_h, mask=m_t[:, None], other=0.0).to(tl.float32)\n"
OLD_SOFTPLUS = "            _e27_0 = _softplus(r26_dt + r_dt_bias)\n"
OLD_FA = "            b_fa = _sum(tl.where(m_t[:, None], -_e27_0 * tl.exp(r_A_log), 0.0), axis=1)\n"


def patched_states_source(src: str, prefetch: bool) -> str:
    a = src.index("def chunk_states_kernel(")
    b = src.index("@triton.jit", a)
    walk = src[a:b]
    for old in (OLD_LOAD, OLD_SOFTPLUS, OLD_FA):
        assert walk.count(old) == 1, f"the generated walk changed: {old.strip()}"
    if prefetch:
        # the first chunk's dt before the loop, the next chunk's at the end of each step
        first = ("    if not PRE:\n"
                 "        r_dt_next = tl.load(x_dt + (bos + o_t).to(tl.int64) * H + i_h, mask=o_t < T_n, other=0.0)"
                 ".to(tl.float32)\n")
        loop = "    for i_c in range(0, n_chunks):\n"
        assert walk.count(loop) == 1
        walk = walk.replace(loop, first + loop)
        walk = walk.replace(OLD_LOAD, "            r26_dtv = r_dt_next\n"
                            "            r_dt_next = tl.load(x_dt + (rows + BT).to(tl.int64) * H + i_h, "
                            "mask=pos + BT < T_n, other=0.0).to(tl.float32)\n")
    else:
        walk = walk.replace(OLD_LOAD, "            r26_dtv = tl.load(x_dt + rows.to(tl.int64) * H + i_h, mask=m_t, "
                            "other=0.0).to(tl.float32)\n")
    walk = walk.replace(OLD_SOFTPLUS, "            _e27_v = _softplus(r26_dtv + r_dt_bias)\n"
                        "            _e27_0 = _e27_v[:, None]\n")
    walk = walk.replace(OLD_FA, "            b_fa = tl.where(m_t, -_e27_v * tl.exp(r_A_log), 0.0)\n")
    return src[:a] + walk + src[b:]


def load(src: str, name: str):
    d = Path(tempfile.mkdtemp(prefix="mf-rowload-"))
    path = d / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shape", default="4,8192,16,128,128")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)

    import mixforge as mf
    from benchmarks.chunk_bench import cfg_of, rel
    from benchmarks.compare import MAMBA2, kernel_profile, on_pass
    from benchmarks.runinfo import Results, timer
    from mixforge.spec.testing import random_inputs

    dev = "cpu" if args.smoke else "cuda"
    B, T, H, K, V = (1, 40, 2, 16, 16) if args.smoke else (int(p) for p in args.shape.split(","))
    dtype = torch.float32 if args.smoke else torch.bfloat16
    cfg = cfg_of("16,16,4,1,0,t" if args.smoke else "64,64,4,2,0,t")
    bench = timer(args.smoke)
    res = Results(args.out, "walk_rowload", gpu=not args.smoke, shape=dict(B=B, T=T, H=H, K=K, V=V, dtype=str(dtype)))
    x = random_inputs(MAMBA2, B=B, T=T, H=H, K=K, V=V, G=1, dtype=dtype, device=dev, seed=0)
    ops = mf.compile(MAMBA2, config_lookup=lambda m, sk: cfg if sk.kernel == "chunk_fwd" else None)
    generated = ops.module.chunk_states_kernel
    from mixforge.codegen import chunk as chunk_path
    chunk_path.walk_keys = lambda c, split: False      # the walk computes its maps, as unsplit
    run = lambda: ops.chunk(**x)[0]  # noqa: E731
    y0 = run().detach()
    for variant in ("generated", "vector", "prefetch"):
        if variant == "generated":
            ops.module.chunk_states_kernel = generated
        else:
            mod = load(patched_states_source(ops._source, variant == "prefetch"), f"mf_rowload_{variant}")
            ops.module.chunk_states_kernel = mod.chunk_states_kernel
        y = run().detach()
        row = dict(variant=variant, rel_y=rel(y, y0), fwd_ms=on_pass(run, [], "fwd", bench))
        if not args.smoke:
            row["profile"] = on_pass(run, [], "fwd", kernel_profile)[:4]
        res.add(row)
    ops.module.chunk_states_kernel = generated
    print(f"wrote {res.path}")
    return 0 if all(r["rel_y"] < 1e-2 for r in res.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
