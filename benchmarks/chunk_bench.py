"""The chunked kernels on a GPU in one call: cold compile time, correctness, and timings per config.

    python -m benchmarks.chunk_bench --out DIR [--mixers gla,mamba2] [--fwd 64,64,8,2,f ...] [--bwd 64,64,8,2 ...]

1. cold compile: the first fwd+bwd of gla on an empty Triton cache (the issue's "compilation only" time);
2. the configs of every mixer are compiled in parallel worker processes (tiny shapes, same
   specializations), so that the timings below do not wait for compilation;
3. correctness at B=2, T=600, H=4, K=V=128 against the float64 recurrence (values, final state and every
   input gradient), fp32 and bf16, normal and strong decays;
4. timings at B=16, T=2048, H=16, K=V=128, bf16: the core forward (run_forward) and backward
   (run_backward) per config, their outputs compared across configs, then ops.chunk fwd and fwd+bwd
   end to end with the best pair; registers and spills of every compiled chunk kernel.

A config is chunk,BV,num_warps,num_stages[,f|t] (f: fused, t: two_pass forward).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sys
import time
import traceback

import torch

#: CHUNK_BENCH_DRY=1: run every step on the CPU interpreter at tiny sizes (catches mistakes before GPU time)
DRY = os.environ.get("CHUNK_BENCH_DRY") == "1"
DEV = "cpu" if DRY else "cuda"
FWD = ["64,64,4,2,f", "64,128,8,2,f", "32,64,4,2,f", "32,128,8,2,f", "64,64,8,2,f", "64,64,4,3,f",
       "64,64,4,2,t"]
BWD = ["64,64,8,2", "64,128,8,2", "32,64,8,2", "64,64,8,3", "32,128,8,2", "64,64,4,2"]
# the heuristic defaults (codegen.config.heuristic_config for K = V = 128): checked for correctness
CHECK = ("64,64,4,2,f", "64,64,8,2")


def mixers():
    from benchmarks.compare import GLA_CORE, LINEAR, MAMBA2, SCALAR_DECAY
    return {"linear_attention": LINEAR, "scalar_decay": SCALAR_DECAY, "gla": GLA_CORE, "mamba2": MAMBA2}


def keys_pass_off(off: bool = True):
    """Within it (where `off`), the split states walks compute their decayed keys at every step instead of
    reading the keys pass's (forced_walk("step")): what the keys pass is worth. Restored after."""
    return forced_walk("step" if off else "rule")


@contextlib.contextmanager
def forced_walk(mode: str = "rule"):
    """Within it, every split walk of a decay (without normalize) runs `mode` whatever its length and tiles:
    "step" computes its maps and decays at every step, "keys" reads the keys pass's decayed keys, "factors"
    only its decay factors (the forward's walk; per-key decays and the backward: the keys); "rule" leaves
    codegen.chunk's rule. Restored after."""
    from mixforge.codegen import chunk as chunk_path
    real = chunk_path.walk_keys, chunk_path.walk_factors
    if mode != "rule":
        chunk_path.walk_keys = lambda c, split, *tiles: (mode != "step" and split and c.decay != "none"
                                                         and not c.normalize)
        chunk_path.walk_factors = lambda c, *tiles: mode == "factors" and c.decay != "key"
    try:
        yield
    finally:
        chunk_path.walk_keys, chunk_path.walk_factors = real


@contextlib.contextmanager
def factors_pass_off(off: bool = True):
    """Within it (where `off`), a walk that reads a pass reads the decayed keys, never only the decay factors
    (codegen.chunk.walk_factors off): what the factors are worth against the keys pass. Restored after."""
    from mixforge.codegen import chunk as chunk_path
    real = chunk_path.walk_factors
    if off:
        chunk_path.walk_factors = lambda c, *tiles: False
    try:
        yield
    finally:
        chunk_path.walk_factors = real


def cfg_of(s: str):
    """A config from chunk,BV,num_warps,num_stages[,BK][,t|p|f]: BK a key block (0: all of K), t two-pass,
    p paired, f (the default) fused."""
    from mixforge.codegen.config import KernelConfig
    chunk, bv, w, st, *rest = s.split(",")
    bk = int(rest.pop(0)) if rest and rest[0].isdigit() else 0
    strategy = {(): "fused", ("f",): "fused", ("t",): "two_pass", ("p",): "paired"}.get(tuple(rest))
    if strategy is None:
        raise ValueError(f"config {s!r}: chunk,BV,num_warps,num_stages[,BK][,t|p|f]")
    return KernelConfig(chunk=int(chunk), sub_chunk=16, BK=bk or None, BV=int(bv), num_warps=int(w),
                        num_stages=int(st), strategy=strategy)


def inputs(mixer, B, T, H, K, V, dtype, seed=0, decay="normal", requires_grad=False):
    from mixforge.spec.testing import random_inputs
    x = random_inputs(mixer, B=B, T=T, H=H, K=K, V=V, G=1, dtype=dtype, device=DEV, seed=seed, decay=decay)
    for n in ("q", "k", "r", "C", "B"):   # moderate logits at K = 128, as benchmarks.compare
        if n in x and x[n].dim() == 4:
            x[n] = (x[n].float() * 0.5).to(dtype)
    if requires_grad:
        for t in x.values():
            t.requires_grad_(True)
    return x


def lookup(fwd, bwd):
    def f(mixer, key):
        return fwd if key.kernel == "chunk_fwd" else bwd if key.kernel == "chunk_bwd" else None
    return f


def capture(ops, x):
    """The ChunkCall of one ops.chunk forward, for launching run_forward / run_backward directly."""
    from mixforge.codegen import chunk as cp
    box = {}
    real = cp.forward

    def spy(ctx, config):
        box["call"] = cp.ChunkCall.from_ctx(ctx)
        return real(ctx, config)
    cp.forward = spy
    try:
        with torch.no_grad():
            ops.chunk(**x)
    finally:
        cp.forward = real
    return box["call"]


def bench(fn, warmup=25, rep=150):
    if DRY:
        t = time.time()
        fn()
        return (time.time() - t) * 1e3
    import triton
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------- precompile workers

def _warm(task):
    name, dtype_name, fwds, bwds = task
    import mixforge as mf
    from mixforge.codegen import chunk as cp
    out = []
    try:
        m = mixers()[name]
        dtype = getattr(torch, dtype_name)
        ops = mf.compile(m)
        Bw, Tw, Hw, Kw = (1, 40, 2, 8) if DRY else (4, 256, 16, 128)
        x = inputs(m, Bw, Tw, Hw, Kw, Kw, dtype)
        call = capture(ops, x)
        do = torch.randn(Bw, Tw, Hw, Kw, device=DEV)
        for f in fwds:
            if DRY:
                f = f.replace("64", "16").replace("32", "16")
            t = time.time()
            cp.run_forward(call, cfg_of(f))
            out.append((name, dtype_name, "fwd", f, time.time() - t))
        for b in bwds:
            t = time.time()
            cp.run_backward(call, cfg_of(b), do, None, None)
            out.append((name, dtype_name, "bwd", b, time.time() - t))
        if not DRY:
            torch.cuda.synchronize()
    except Exception:
        out.append((name, dtype_name, "error", traceback.format_exc()[-1500:], 0.0))
    return out


def precompile(names, fwds, bwds, workers, check_names=()):
    tasks = []
    for n in names:
        for b in bwds:
            tasks.append((n, "bfloat16", [], [b]))
        for f in fwds:
            tasks.append((n, "bfloat16", [f], []))
    for n in check_names:
        tasks.append((n, "float32", [CHECK[0]], [CHECK[1]]))
    tasks.sort(key=lambda t: (t[1] != "float32", not t[3]))   # the long compiles first
    if DRY:
        tasks = [t for t in tasks if t[1] == "float32"][:2]
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(workers, len(tasks))) as pool:
        res = [r for rs in pool.map(_warm, tasks, chunksize=1) for r in rs]
    return res


# --------------------------------------------------------------------------- kernels' resources

def resources(module) -> dict:
    out = {}
    for kname in ("chunk_fwd_kernel", "chunk_states_kernel", "chunk_dstates_kernel", "chunk_bwd_kernel"):
        fn = getattr(module, kname, None)
        caches = getattr(fn, "device_caches", {}) or {}
        rows = []
        for entry in caches.values():
            for part in (entry if isinstance(entry, tuple) else (entry,)):
                if isinstance(part, dict):
                    for k in part.values():
                        if hasattr(k, "n_regs"):
                            md = k.metadata
                            rows.append(dict(regs=k.n_regs, spills=k.n_spills, warps=md.num_warps,
                                             stages=md.num_stages, smem=md.shared))
        out[kname] = rows
    return out


# --------------------------------------------------------------------------- correctness

def check(m, dtype, decay, fwd, bwd, B=2, T=608, H=4, K=128, V=128):
    if DRY:
        B, T, H, K, V = 1, 40, 2, 8, 8
    import mixforge as mf
    ops = mf.compile(m, config_lookup=lookup(cfg_of(fwd), cfg_of(bwd)))
    x = inputs(m, B, T, H, K, V, dtype, seed=1, decay=decay, requires_grad=True)
    g = torch.Generator(device=DEV).manual_seed(3)
    S0 = torch.randn(B, H, K, V, device=DEV, generator=g).requires_grad_(True)
    y, ST = ops.chunk(**x, initial_state=S0, output_final_state=True)
    xr = {n: t.detach().double().requires_grad_(True) for n, t in x.items()}
    S0r = S0.detach().double().requires_grad_(True)
    yr, STr = mf.reference(m, **xr, initial_state=S0r, output_final_state=True)
    gy = torch.randn(yr.shape, device=DEV, dtype=torch.float64, generator=g)
    gS = torch.randn(STr.shape, device=DEV, dtype=torch.float64, generator=g)
    loss = (y.float() * gy.float()).sum() + (ST * gS.float()).sum()
    loss_r = (yr * gy).sum() + (STr * gS).sum()
    names = list(x) + ["S0"]
    gr = torch.autograd.grad(loss, list(x.values()) + [S0])
    grr = torch.autograd.grad(loss_r, list(xr.values()) + [S0r])
    errs = {"y": rel(y, yr), "S_T": rel(ST, STr)}
    errs.update({f"d{n}": rel(a, b) for n, a, b in zip(names, gr, grr)})
    return errs


# --------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--mixers", default="linear_attention,scalar_decay,gla,mamba2")
    ap.add_argument("--fwd", nargs="*", default=FWD)
    ap.add_argument("--bwd", nargs="*", default=BWD)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--check-mixers", default=None, help="mixers to check (default: all of --mixers)")
    ap.add_argument("--no-strong", action="store_true")
    ap.add_argument("--profile", action="store_true", help="kernel-time breakdown of the e2e fwd+bwd step")
    ap.add_argument("--timing-mixer", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timing-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.timing_mixer:
        with open(args.timing_out, "w") as f:
            json.dump(timing(args.timing_mixer, args), f)
        return 0
    import triton

    import mixforge as mf
    from mixforge.codegen import chunk as cp
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"chunk_bench-{stamp}.json")
    res = {"torch": torch.__version__, "triton": triton.__version__, "date": stamp, "device": device_label(),
           "fwd_configs": args.fwd,
           "bwd_configs": args.bwd}

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    names = args.mixers.split(",")
    M = mixers()
    t_all = time.time()
    # 1. cold compile of the first fwd+bwd (heuristic configs), on an empty Triton cache
    if not args.no_cold:
        try:
            m = M["gla"]
            ops = mf.compile(m)
            x = inputs(m, 2, 512, 16, 128, 128, torch.bfloat16, requires_grad=True) if not DRY else \
                inputs(m, 1, 40, 2, 8, 8, torch.float32, requires_grad=True)
            t = time.time()
            y = ops.chunk(**x)[0]
            sync()
            t1 = time.time()
            y.backward(torch.randn_like(y))
            sync()
            t2 = time.time()
            y = ops.chunk(**x)[0]
            y.backward(torch.randn_like(y))
            sync()
            t3 = time.time()
            res["cold_compile"] = dict(mixer="gla", first_fwd_s=t1 - t, first_bwd_s=t2 - t1, warm_fwd_bwd_s=t3 - t2,
                                       config_fwd=str(ops.config("chunk_fwd", ops_shapes(ops, x))),
                                       config_bwd=str(ops.config("chunk_bwd", ops_shapes(ops, x))))
            print("cold compile:", res["cold_compile"], flush=True)
        except Exception:
            res["cold_compile"] = {"error": traceback.format_exc()[-1500:]}
            print(res["cold_compile"]["error"])
        save()
    checks = names if args.check_mixers is None else [c for c in args.check_mixers.split(",") if c]
    # 2. precompile everything else in parallel
    t = time.time()
    try:
        res["precompile"] = precompile(names, args.fwd, args.bwd, args.workers, checks)
        errs = [r for r in res["precompile"] if r[2] == "error"]
        for e in errs:
            print("precompile error", e[0], e[1], e[3])
    except Exception:
        res["precompile_error"] = traceback.format_exc()[-1500:]
        print(res["precompile_error"])
    res["precompile_s"] = time.time() - t
    print(f"precompile: {res['precompile_s']:.1f}s", flush=True)
    save()
    # 3. correctness
    res["check"] = {}
    if True:
        for n in checks:
            for dtype, decay in ((torch.float32, "normal"), (torch.bfloat16, "normal"), (torch.float32, "strong")):
                if decay == "strong" and args.no_strong:
                    continue
                if DRY and dtype != torch.float32:
                    continue
                if decay == "strong" and n not in ("gla", "mamba2", "scalar_decay"):
                    continue
                key = f"{n}/{str(dtype)[6:]}/{decay}"
                try:
                    res["check"][key] = check(M[n], dtype, decay, *CHECK)
                except Exception:
                    res["check"][key] = {"error": traceback.format_exc()[-1200:]}
                e = res["check"][key]
                worst = max((v for k, v in e.items() if isinstance(v, float)), default=float("nan"))
                print(f"check {key}: worst {worst:.2e}  {e if 'error' in e else ''}", flush=True)
        save()
    # 4. timings: one child process per mixer (a kernel fault cannot take the other mixers down)
    res["timings"] = {}
    import subprocess
    import tempfile
    for n in names:
        fd, part = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        cmd = [sys.executable, "-m", "benchmarks.chunk_bench", "--timing-mixer", n, "--timing-out", part,
               "--fwd", *args.fwd, "--bwd", *args.bwd] + (["--profile"] if args.profile else [])
        t = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        try:
            with open(part) as f:
                res["timings"][n] = json.load(f)
        except Exception:
            res["timings"][n] = {"error": (proc.stdout + proc.stderr)[-2000:]}
        r = res["timings"][n]
        print(f"[{n}] {time.time() - t:.0f}s fwd {r.get('fwd')} bwd {r.get('bwd')} e2e {r.get('e2e')}", flush=True)
        if "error" in r:
            print(r["error"][-1500:])
        save()
    res["total_s"] = time.time() - t_all
    save()
    # table
    print("\n| mixer | best fwd cfg | core fwd ms | best bwd cfg | core bwd ms | e2e fwd heur/best | "
          "e2e fwd+bwd heur/best | floor |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in res["timings"].items():
        if "best" in r and "best" in r.get("e2e", {}):
            bf, bb = r["best"]
            h, b = r["e2e"].get("heuristic", {}), r["e2e"]["best"]
            print(f"| {n} | {bf} | {r['fwd'][bf]:.3f} | {bb} | {r['bwd'][bb]:.3f} | {h.get('fwd', 0):.3f}/{b['fwd']:.3f} | "
                  f"{h.get('fwd_bwd', 0):.3f}/{b['fwd_bwd']:.3f} | {r['floor_ms_3TBs']:.3f} |")
    for n, r in res["timings"].items():
        print(n, "fwd", {k: round(v, 3) for k, v in r.get("fwd", {}).items()})
        print(n, "bwd", {k: round(v, 3) for k, v in r.get("bwd", {}).items()})
        print(n, "fwd_diff", {k: f"{v:.1e}" for k, v in r.get("fwd_diff", {}).items()})
        print(n, "bwd_diff", {k: f"{max(v.values()):.1e}" for k, v in r.get("bwd_diff", {}).items()})
    for n, r in res["timings"].items():
        for row in r.get("profile_us", []):
            print(n, "profile", row)
    for n, r in res["timings"].items():
        for k, rows in r.get("resources", {}).items():
            print(n, k, [(x["warps"], x["regs"], x["spills"]) for x in rows])
    print(f"wrote {path}; total {res['total_s']:.0f}s")


def timing(n, args) -> dict:
    import mixforge as mf
    from mixforge.codegen import chunk as cp
    m = mixers()[n]
    B, T, H, K, V = (1, 40, 2, 8, 8) if DRY else (16, 2048, 16, 128, 128)
    r = {"fwd": {}, "bwd": {}, "fwd_diff": {}, "bwd_diff": {}, "e2e": {}}
    try:
        ops = mf.compile(m)
        x = inputs(m, B, T, H, K, V, torch.bfloat16)
        call = capture(ops, x)
        ref_o = None
        for f in args.fwd:
            c = cfg_of(f)
            o = cp.run_forward(call, c)[0]
            sync()
            if ref_o is None:
                ref_o = o.clone()
            r["fwd_diff"][f] = rel(o, ref_o)
            r["fwd"][f] = bench(lambda: cp.run_forward(call, c))
        do = torch.randn(B, T, H, V, device=DEV)
        ref_g = None
        for b in args.bwd:
            c = cfg_of(b)
            gr = cp.run_backward(call, c, do, None, None)
            sync()
            gr = {k: v.clone() for k, v in gr.items() if isinstance(v, torch.Tensor)}
            if ref_g is None:
                ref_g = gr
            r["bwd_diff"][b] = {k: rel(v, ref_g[k]) for k, v in gr.items()}
            r["bwd"][b] = bench(lambda: cp.run_backward(call, c, do, None, None))
        bf = min(r["fwd"], key=r["fwd"].get)
        bb = min(r["bwd"], key=r["bwd"].get)
        r["best"] = (bf, bb)
        nbytes = sum(t_.numel() * t_.element_size() for k, t_ in x.items() if k in {o.name for o in m.inputs})
        nbytes += x.get("v", x.get("x")).numel() * 2
        r["floor_ms_3TBs"] = nbytes / 3.0e12 * 1e3
        xs = inputs(m, B, T, H, K, V, torch.bfloat16, requires_grad=True)
        for label, lk in (("heuristic", None), ("best", lookup(cfg_of(bf), cfg_of(bb)))):
            ops = mf.compile(m, config_lookup=lk)
            e = r["e2e"][label] = {}
            with torch.no_grad():
                e["fwd"] = bench(lambda: ops.chunk(**x)[0])
            y = ops.chunk(**xs)[0]
            dy = torch.randn_like(y)

            def step():
                for t_ in xs.values():
                    t_.grad = None
                ops.chunk(**xs)[0].backward(dy)
            e["fwd_bwd"] = bench(step)
            if args.profile and not DRY and label == "best":
                from torch.profiler import ProfilerActivity, profile
                step()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize()
                ka = sorted(prof.key_averages(), key=lambda ev: -getattr(ev, "device_time_total", 0))
                r["profile_us"] = [(ev.key[:60], round(getattr(ev, "device_time_total", 0), 1), ev.count)
                                   for ev in ka[:14]]
        r["resources"] = resources(ops.module)
    except Exception:
        r["error"] = traceback.format_exc()[-2000:]
    return r


def device_label() -> str:
    """The GPU as the result files name it (name, compute capability, SMs), or the interpreter."""
    if DRY:
        return "cpu (interpreter)"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs)"


def sync():
    if not DRY:
        torch.cuda.synchronize()


def ops_shapes(ops, x):
    from mixforge.spec.shapes import resolve_call
    return resolve_call(ops._declared, x)


if __name__ == "__main__":
    sys.exit(main())
