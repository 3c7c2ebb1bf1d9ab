"""Few long sequences on the GPU: the forward's strategy and the states kernels' split, timed per shape.

    python -m benchmarks.strategy_bench --out DIR [--mixers linear_attention,gla] [--shapes 1,32768,16;...]

For each mixer and shape (bf16, K = V = 128) it takes the config a user gets (`ops.config`: tuned, shipped,
nearest or heuristic) and times the core kernels (`run_forward`, `run_backward`, medians of do_bench):

* forward: fused, two_pass with the states kernel's tiles as before (the main kernels' BV and launch, all of
  K), two_pass with `state_tiles`' split, and that with 4 warps (FORWARDS; --forwards picks some);
* backward (its states and dstates kernels) with the old and the new tiles;

and checks that every variant's outputs agree with the first one's. With --sweep-states, the states kernel
alone per tile, warps and stages (STATE_SWEEP) instead. Writes strategy_bench-<stamp>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time

import torch

from benchmarks.chunk_bench import DRY, bench, capture, device_label, inputs, mixers, rel, sync

SHAPES = "1,32768,16;4,8192,16;16,2048,16"


def old_tiles(cp):
    """The states kernels' tiles and launch before the split: all of K, the main kernels' BV and launch."""
    class Old:
        def __enter__(self):
            self.saved = cp.state_tiles
            cp.state_tiles = lambda K, V, NH, BK, BV, n_sm: (max(16, cp.next_pow2(K)), BV, False)

        def __exit__(self, *exc):
            cp.state_tiles = self.saved
    return Old()


#: forward variants: (label, strategy, old state tiles, config changes)
FORWARDS = [("fused", "fused", False, {}), ("two_pass_old_tiles", "two_pass", True, {}),
            ("two_pass", "two_pass", False, {}), ("two_pass_w4", "two_pass", False, dict(num_warps=4))]


def run(name, B, T, H, K, V, forwards=None, backward=True):
    import mixforge as mf
    from mixforge.codegen import chunk as cp
    from mixforge.spec.shapes import resolve_call

    m = mixers()[name]
    ops = mf.compile(m)   # the front door's lookup: what a user gets
    x = inputs(m, B, T, H, K, V, torch.bfloat16)
    call = capture(ops, x)
    sh = resolve_call(m, x)
    cfg_f, cfg_b = ops.config("chunk_fwd", sh), ops.config("chunk_bwd", sh)
    row = dict(mixer=name, B=B, T=T, H=H, K=K, V=V, config_fwd=cfg_f.to_dict(), config_bwd=cfg_b.to_dict(),
               state_tiles=cp.state_tiles(K, V, B * H, cfg_f.BK, min(cfg_f.BV, V), cp.sm_count(call.device))[:2],
               fwd={}, bwd={}, diff={})
    ref = None
    for label, strat, old, change in FORWARDS:
        if forwards is not None and label not in forwards:
            continue
        c = dataclasses.replace(cfg_f, strategy=strat, **change)
        with old_tiles(cp) if old else contextlib.nullcontext():
            o = cp.run_forward(call, c)[0]
            sync()
            ref = o.clone() if ref is None else ref
            row["diff"][label] = rel(o, ref)
            row["fwd"][label] = bench(lambda: cp.run_forward(call, c))
    if not backward:
        return row
    do = torch.randn(B, T, H, V, device=call.device)
    gref = None
    for label, old in (("old_tiles", True), ("split", False)):
        with old_tiles(cp) if old else contextlib.nullcontext():
            g = {k: v.clone() for k, v in cp.run_backward(call, cfg_b, do, None, None).items()
                 if isinstance(v, torch.Tensor)}
            gref = g if gref is None else gref
            row["diff"]["bwd_" + label] = max(rel(v, gref[k]) for k, v in g.items())
            row["bwd"][label] = bench(lambda: cp.run_backward(call, cfg_b, do, None, None))
    return row


#: the states kernel's tiles and launch options swept by --sweep-states: (BK, BV, num_warps, num_stages)
STATE_SWEEP = [(128, 128, 4, 2), (128, 64, 4, 2), (64, 128, 4, 2), (64, 64, 4, 2), (32, 128, 4, 2),
               (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (32, 32, 2, 2), (32, 32, 8, 2), (32, 32, 4, 1),
               (32, 32, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3)]


def sweep_states(name, B, T, H, K, V, sweep="all", kernel="chunk_fwd"):
    """The states kernel alone (S^(c) of every chunk) per tile and launch option, at the chunk of `kernel`'s
    config (chunk_bwd: the walk the backward recomputes)."""
    import mixforge as mf
    from mixforge.codegen import chunk as cp
    from mixforge.spec.shapes import resolve_call

    m = mixers()[name]
    ops = mf.compile(m)
    x = inputs(m, B, T, H, K, V, torch.bfloat16)
    call = capture(ops, x)
    cfg = ops.config(kernel, resolve_call(m, x))
    g0 = cp._geometry(call, cfg, backward=kernel == "chunk_bwd")
    out = {}
    ref = None
    for bk, bv, w, st in SWEEPS[sweep]:
        if DRY:
            bk, bv = min(bk, 64), min(bv, 64)
        g = dataclasses.replace(g0, SBK=bk, SBV=bv, s_warps=w, s_stages=st)
        S = cp._states(call, g, store_final=False)[0]
        sync()
        ref = S.clone() if ref is None else ref
        out[f"{bk},{bv},{w},{st}"] = dict(ms=bench(lambda: cp._states(call, g, store_final=False)), diff=rel(S, ref))
    return dict(mixer=name, B=B, T=T, H=H, K=K, V=V, chunk=cfg.chunk, config=kernel,
                launch=[g0.s_warps, g0.s_stages], tiles=[g0.SBK, g0.SBV], keys_pass=g0.pre, states=out)


#: --sweep-states unsplit: the walks of many sequences (not split: all of K, the main kernels' BV), which take
#: the launch of the config they serve (the backward's: 8 warps, 1 stage at B = 4) against launches of their own
UNSPLIT_SWEEP = [(128, 64, 8, 1), (128, 64, 4, 1), (128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 2),
                 (128, 64, 8, 3), (128, 128, 8, 1), (128, 128, 8, 2), (128, 128, 4, 2), (128, 128, 4, 3)]

#: --sweep-states small: tiles below MIN_STATE_TILE, for few long sequences
SMALL_SWEEP = [(32, 32, 4, 3), (16, 32, 4, 3), (32, 16, 4, 3), (16, 16, 4, 3), (16, 16, 2, 3), (16, 32, 2, 3),
               (32, 32, 2, 3), (32, 32, 4, 4)]


#: --sweep-states stages: deeper pipelines for the split walks (SPLIT_LAUNCH's stages), 32- and 64-wide tiles
STAGES_SWEEP = [(32, 32, 4, 3), (32, 32, 4, 4), (32, 32, 4, 5), (32, 32, 2, 4), (32, 64, 4, 4), (64, 32, 4, 4),
                (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 4), (32, 128, 4, 3), (32, 128, 4, 4)]


#: --sweep-states NAME: the tiles and launches it times
SWEEPS = {"all": STATE_SWEEP, "small": SMALL_SWEEP, "stages": STAGES_SWEEP, "unsplit": UNSPLIT_SWEEP}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--mixers", default="linear_attention,scalar_decay,gla,mamba2")
    ap.add_argument("--shapes", default=SHAPES, help="B,T,H;... (K = V = 128, bf16)")
    ap.add_argument("--sweep-states", nargs="?", const="all", choices=tuple(SWEEPS), default=None,
                    help="time the states kernel alone per a list of SWEEPS")
    ap.add_argument("--sweep-config", default="chunk_fwd", choices=("chunk_fwd", "chunk_bwd"),
                    help="--sweep-states at the chunk (and keys pass) of this kernel's config")
    ap.add_argument("--forwards", default=None, help="labels of FORWARDS to time (default: all)")
    ap.add_argument("--no-bwd", action="store_true", help="forward variants only")
    ap.add_argument("--split-launch", default=None,
                    help="W,S: num_warps and num_stages of the split states walks for this run (chunk.SPLIT_LAUNCH "
                         "and SPLIT_LAUNCH_NO_DECAY)")
    ap.add_argument("--walk-launch", default=None,
                    help="W,S: num_warps and num_stages of the walks that are not split, for this run "
                         "(chunk.WALK_LAUNCH; default: the launch of the config they serve)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    pair = lambda s: tuple(int(n) for n in s.split(",")) if s else None  # noqa: E731
    with launches(split=pair(args.split_launch), walk=pair(args.walk_launch)):
        return _run_all(args)


@contextlib.contextmanager
def launches(split=None, walk=None):
    """Within it, the split walks run at `split` (num_warps, num_stages; chunk.SPLIT_LAUNCH and
    SPLIT_LAUNCH_NO_DECAY) and the unsplit ones at `walk` (chunk.WALK_LAUNCH), where given. Restored after."""
    from mixforge.codegen import chunk as cp

    saved = cp.SPLIT_LAUNCH, cp.SPLIT_LAUNCH_NO_DECAY, cp.WALK_LAUNCH
    if split:
        cp.SPLIT_LAUNCH = cp.SPLIT_LAUNCH_NO_DECAY = split
    if walk:
        cp.WALK_LAUNCH = walk
    try:
        yield
    finally:
        cp.SPLIT_LAUNCH, cp.SPLIT_LAUNCH_NO_DECAY, cp.WALK_LAUNCH = saved


def _run_all(args):
    import triton

    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"strategy_bench-{stamp}.json")
    res = {"device": device_label(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": []}
    if args.split_launch:
        res["split_launch"] = args.split_launch
    if args.walk_launch:
        res["walk_launch"] = args.walk_launch
    for name in args.mixers.split(","):
        for shp in args.shapes.split(";"):
            B, T, H = map(int, shp.split(","))
            K = V = 128
            if DRY:
                B, T, H, K, V = min(B, 1), 70, 2, 64, 64
            t0 = time.time()
            try:
                row = (sweep_states(name, B, T, H, K, V, args.sweep_states, args.sweep_config) if args.sweep_states
                       else run(name, B, T, H, K, V, args.forwards and args.forwards.split(","), not args.no_bwd))
            except Exception as e:   # one failing case must not lose the others
                row = dict(mixer=name, B=B, T=T, H=H, error=f"{type(e).__name__}: {e}"[:1500])
            row["seconds"] = round(time.time() - t0, 1)
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            with open(path, "w") as f:
                json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
