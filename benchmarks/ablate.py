"""Where does one generated kernel's time go? Time it with parts of its math taken out, in one GPU call.

    python -m benchmarks.ablate --out DIR [--mixer scalar_decay] [--kernel chunk_fwd_kernel] [--shape B,T,H,K,V]
           [--config chunk,BV,num_warps,num_stages[,f|t]]
    TRITON_INTERPRET=1 python -m benchmarks.ablate --smoke [--mixer gla_recurrent --kernel recurrent_fwd_kernel]

Each variant renders the mixer's module (a case of benchmarks.compare), replaces lines of one kernel only, and
times the forward's kernels (torch.profiler, device time per call).

chunk_fwd_kernel. The profile at B = 1, T = 32768 (compare-20261122-145744) has scalar decay's per-chunk output
kernel (the two-pass forward's chunk_fwd_kernel) at 465 us against linear attention's 291, with the same tiles,
the same loads and one program per SM either way. What scalar decay adds per chunk is a chain: the decay's
load and log-sigmoid, its cumulative sum over the chunk (a scan across warps), the [BT, BT] decay matrix's
exps, q scaled by exp(B), and the fp32 diagonal:

  baseline         the kernel as generated
  no_cumsum        B = the per-token log decay instead of its cumulative sum (no scan)
  no_decay_matrix  the attention block masked only, as linear attention's
  no_qe_scale      q @ S not scaled by exp(B). Until 2026-11-22 the kernel scaled q (the [BT, BK] dot operand),
                   and this variant took it from 470 to 315 us (ablate-20261122-162209); it now scales the
                   [BT, BV] accumulator
  no_diag          no fp32 diagonal (q . k of the fp32 features)
  linear_like      all four: what is left differs from linear attention's kernel in the decay's load only
  one_accumulator  not a cut: A @ v accumulated onto exp(B) * (q @ S) in one dot (same output)

recurrent_fwd_kernel (gla_recurrent). The recurrent path takes 3x FLA's fused_recurrent_gla at B = 16,
T = 2048; each program's time per token is latency:

  no_bonus_sum     the delayed state form's second reduction (q . k of the pending token) left out
  current_first    the token absorbed before the read: o = q . (exp(fa) S + k v^T), one reduction
  no_decay         no multiply of the state by the decay

chunk_states_kernel (mamba2). Its walk took 737 us at B = 4, T = 8192 against the scalar decay's 376 with the same
tiles: each step waited on its dt loads (2-byte values a row apart, which cp.async cannot take). The templates
now load the k side's per-row scalar inputs one chunk ahead (emit.load_ahead). The walk computes its maps only
without the keys pass, so for this kernel the keys pass is off (codegen.chunk.walk_keys), and the default config
is the two-pass forward with all of K:

  in_step          every walk's per-row scalar inputs loaded in the step that uses them, as before: the module
                   rendered without load_ahead (same output; ablate-20261122-224218 called it dt_in_step)
  no_cumsum        the chunk's cumulative log-decay not summed
  no_decay_math    no cumulative sum, no exponentials, no decay of the state: what the walk would take with its
                   decay factors computed off its path

The same variant for the fused forward's walk (chunk_fwd_kernel, with a fused --config) and the dstates walk
(chunk_dstates_kernel: the keys pass off, forward and backward timed, the default config two-pass with all of K).

chunk_bwd_kernel (linear_attention). With all of K in one block it took 939 us at B = 4, T = 8192 before the
backward's key blocks and 1030 after them (compare-bisect-20261123-0240-*); putting dv back before the dk
accumulation gave 988. The key tile's offset was the rest: 1004 us with it, 934 without (ablate-20261123-031408,
where the variant was the other way round). The kernels now start their key tile at a constant 0 when all of K
is one block (chunk_macros.set_k_block); for the backward kernel and the two walks:

  keys_at_program_id  o_k = i * BK + arange(BK), i being the key block's runtime index (0 at run time), as
                      before (same output)

The variants compute wrong outputs on purpose, except where they say "same output"; only their times mean
something. Writes ablate-<stamp>.json with device, versions and date.
"""
from __future__ import annotations

import argparse
import re
import time

import torch

CUMSUM = ("b_B = tl.cumsum(b_fa, 0)", "b_B = b_fa")
DECAY_MATRIX = (" * tl.where(m_lo, tl.exp(tl.where(m_lo, b_B[:, None] - b_B[None, :], 0.)), 0.)",
                " * tl.where(m_lo, 1.0, 0.)")
QE_SCALE = ("b_eB[:, None] * ", "")
DIAG = ("b_A += tl.where(m_eye, b_diag[:, None], 0.)", "b_A += tl.where(m_eye, 1.0, 0.)")
# the recurrent forward of a per-key decay (gla): the delayed state form's read and its update
READ = "b_o = scale * (_sum(b_fq[:, None] * b_S, axis=0) + _sum(b_fq * b_fk, axis=0) * b_fv)"
ABSORB = "b_S += b_kp[:, None] * b_vp[None, :]\n        b_S = b_S * b_ea[:, None]\n"

#: a variant rendered with no per-row input loaded ahead (emit.Emitter._loads_ahead false): every walk loads its
#: per-row scalar inputs in the step that uses them, as before the templates loaded them a chunk ahead
IN_STEP = "render without load_ahead"
#: the config each kernel is timed with when --config is not given (None: the ops' own lookup)
DEFAULT_CONFIG = {"chunk_states_kernel": ("64,64,4,2,t", "16,16,4,1,t"),    # (GPU, --smoke)
                  "chunk_dstates_kernel": ("64,64,4,2,t", "16,16,4,1,t")}
#: kernels of the backward: their variants are timed forward and backward
BACKWARD = ("chunk_dstates_kernel", "chunk_bwd_kernel")
#: the walks that compute their maps only without the keys pass (codegen.chunk.walk_keys), which is off for them
WALKS = ("chunk_states_kernel", "chunk_dstates_kernel")
#: variants that reorder or move work without changing the output
SAME_OUTPUT = ("current_first", "one_accumulator", "in_step", "tiles_ahead", "tiles_to_dot",
               "keys_at_program_id")


def _one_acc(S):
    """(q @ S) scaled, then A @ v accumulated onto it in the same dot: one accumulator instead of two"""
    two = (f"b_acc = tl.dot((b_A).to(DOT_DT), (b_vk).to(DOT_DT), input_precision=PREC) + b_eB[:, None] * "
           f"tl.dot((b_q).to(DOT_DT), ({S}).to(DOT_DT), input_precision=PREC)")
    one = (f"b_acc = tl.dot((b_A).to(DOT_DT), (b_vk).to(DOT_DT), acc=b_eB[:, None] * "
           f"tl.dot((b_q).to(DOT_DT), ({S}).to(DOT_DT), input_precision=PREC), input_precision=PREC)")
    return two, one


def _keys_at_program_id(body: str) -> list[tuple[str, str]]:
    """With all of K in one block (K <= BK) the key tile starts at a constant 0 (chunk_macros.set_k_block); this
    puts back the start at the key block's runtime index (0 at run time), as before 2026-11-23 (same output)."""
    m = re.search(r"^( +)if K > BK:\n +o_k = (\w+) \* BK \+ tl\.arange\(0, BK\)", body, flags=re.M)
    if m is None:
        raise SystemExit("ablate: no key tile of a key block (set_k_block) in the kernel")
    ind, index = m.group(1), m.group(2)
    return [(f"{ind}else:\n{ind}    o_k = 0 + tl.arange(0, BK)",
             f"{ind}else:\n{ind}    o_k = {index} * BK + tl.arange(0, BK)")]


ABLATIONS = {
    "chunk_fwd_kernel": {
        "baseline": [],
        "no_cumsum": [CUMSUM],
        "no_decay_matrix": [DECAY_MATRIX],
        "no_qe_scale": [QE_SCALE],
        "no_diag": [DIAG],
        "linear_like": [CUMSUM, DECAY_MATRIX, QE_SCALE, DIAG],
        "one_accumulator": [_one_acc("b_Sb"), _one_acc("b_S")],
        "in_step": IN_STEP,
    },
    "recurrent_fwd_kernel": {
        "baseline": [],
        # no q . k reduction for the pending token (the delayed form's second sum)
        "no_bonus_sum": [(READ, "b_o = scale * (_sum(b_fq[:, None] * b_S, axis=0) + b_fv)")],
        # the token absorbed before the read, one reduction: o = q . (exp(fa) S + k v^T)
        "current_first": [(ABSORB, "b_S = b_S * b_ea[:, None] + b_fk[:, None] * b_fv[None, :]\n"),
                          (READ, "b_o = scale * _sum(b_fq[:, None] * b_S, axis=0)")],
        "no_decay": [(" * b_ea[:, None]", "")],
    },
    "chunk_states_kernel": {
        "baseline": [],
        "in_step": IN_STEP,
        # what the walk's decay math costs it without the keys pass: the cumulative sum, then all of it
        "no_cumsum": [CUMSUM],
        "no_decay_math": [CUMSUM, ("b_kd = b_fk * tl.exp((b_last - b_B)[:, None])", "b_kd = b_fk"),
                          ("b_S = b_S * tl.exp(b_last)", "b_S = b_S")],
        "keys_at_program_id": _keys_at_program_id,
    },
    "chunk_dstates_kernel": {"baseline": [], "in_step": IN_STEP, "keys_at_program_id": _keys_at_program_id},
    "chunk_bwd_kernel": {"baseline": [], "keys_at_program_id": _keys_at_program_id},
}


def _tile_loads(body: str) -> tuple[str, str, str]:
    """The step's k and v tile loads of a walk over the identity maps (linear attention): their tile names."""
    m = re.search(r"^ +(r\d+)_k = tl\.load\(x_k .*$", body, flags=re.M)
    if m is None:
        raise SystemExit("ablate: no k tile load in the walk (the tiles variants take linear attention)")
    return m.group(1), m.group(0), re.search(rf"^ +{m.group(1)}_v = tl\.load\(x_v .*$", body, flags=re.M).group(0)


def _tiles_ahead(body: str) -> list[tuple[str, str]]:
    """k and v of the next chunk loaded during this chunk's step, raw, in registers (same output)."""
    r, load_k, load_v = _tile_loads(body)
    ind = " " * (len(load_k) - len(load_k.lstrip()))

    def at(rows, m, n):     # the raw tile of input n (k or v) at rows, masked by m
        dim, side = ("K", "k") if n == "k" else ("V", "v")
        return (f"tl.load(x_{n} + (({rows}).to(tl.int64)[:, None] * H + i_h) * {dim} + o_{side}[None, :], "
                f"mask=({m})[:, None] & m_{side}[None, :], other=0.0)")
    first = (f"    ak_k = {at('bos + o_t', 'o_t < T_n', 'k')}\n"
             f"    ak_v = {at('bos + o_t', 'o_t < T_n', 'v')}\n")
    step = (f"{ind}{r}_k = ak_k.to(tl.float32)\n{ind}{r}_v = ak_v.to(tl.float32)\n"
            f"{ind}ak_k = {at('rows + BT', 'pos + BT < T_n', 'k')}\n"
            f"{ind}ak_v = {at('rows + BT', 'pos + BT < T_n', 'v')}")
    return [("    n_chunks = tl.cdiv(L_n, BT)\n", "    n_chunks = tl.cdiv(L_n, BT)\n" + first),
            (load_k + "\n" + load_v, step)]


def _tiles_to_dot(body: str) -> list[tuple[str, str]]:
    """The loaded k and v tiles straight into the dot, in their own dtype (the masks of the loads already zero
    the rows outside; same output), where the pipeliner can take them."""
    r, load_k, load_v = _tile_loads(body)
    return [(load_k, load_k.replace(".to(tl.float32)", "")), (load_v, load_v.replace(".to(tl.float32)", "")),
            ("b_S = b_S + tl.dot((tl.trans(b_kd)).to(DOT_DT), (b_fv).to(DOT_DT), input_precision=PREC)",
             f"b_S = b_S + tl.dot(tl.trans({r}_k), {r}_v, input_precision=PREC)")]


#: linear attention's states walk (no decay, maps the identity): its k and v tiles, loaded in the step that uses
#: them and passed through the maps' masks, are not software-pipelined (benchmarks/NOTES.md, eleventh session)
ABLATIONS["chunk_states_kernel/tiles"] = {
    "baseline": [],
    "tiles_ahead": _tiles_ahead,
    "tiles_to_dot": _tiles_to_dot,
}


def patch_kernel(source: str, kernel: str, edits) -> str:
    """source with each (old, new) replaced inside `def kernel(` up to the next @triton.jit; every old must be
    there (a template edit that moves a line fails here, not silently as an unchanged variant). `edits` may
    also be a function of the kernel's source that returns those pairs (for names the render numbers)."""
    m = re.search(rf"^def {kernel}\(.*?(?=^@triton\.jit|\Z)", source, flags=re.S | re.M)
    if m is None:
        raise SystemExit(f"ablate: no kernel {kernel} in the rendered module")
    body = m.group(0)
    for old, new in (edits(body) if callable(edits) else edits):
        if old not in body:
            raise SystemExit(f"ablate: {old!r} is not in {kernel}")
        body = body.replace(old, new)
    return source[:m.start()] + body + source[m.end():]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--mixer", default="scalar_decay", help="a case of benchmarks.compare")
    ap.add_argument("--kernel", default="chunk_fwd_kernel")
    ap.add_argument("--shape", default="1,32768,16,128,128", help="B,T,H,K,V")
    ap.add_argument("--variants", default=None, help="default: every variant of --kernel")
    ap.add_argument("--config", default=None,
                    help="chunk,BV,num_warps,num_stages[,f|t] (fused, the default, or two_pass): one config for both "
                         "passes; tuned: the ops' own lookup (the tuned or shipped config)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)

    from benchmarks.chunk_bench import keys_pass_off
    from benchmarks.runinfo import Results
    from benchmarks.compare import CASES
    from mixforge.spec.testing import random_inputs

    case = next(c for c in CASES if c.name == args.mixer)
    variants = ABLATIONS[args.kernel]
    config = None
    kernel = args.kernel.split("/")[0]     # a kernel, or kernel/set for another set of its variants
    cfg_str = args.config or (DEFAULT_CONFIG[kernel][args.smoke] if kernel in DEFAULT_CONFIG else None)
    cfg_str = None if cfg_str == "tuned" else cfg_str
    if cfg_str:
        from benchmarks.chunk_bench import cfg_of
        config = cfg_of(cfg_str)
    dev = "cpu" if args.smoke else "cuda"
    B, T, H, K, V = (1, 40, 2, 16, 16) if args.smoke else (int(p) for p in args.shape.split(","))
    dtype = torch.float32 if args.smoke else torch.bfloat16
    x = random_inputs(case.mixer, B=B, T=T, H=H, K=K, V=V, G=case.G, dtype=dtype, device=dev, seed=0)
    res = Results(args.out, "ablate", gpu=not args.smoke, mixer=args.mixer, kernel=args.kernel, config=cfg_str,
                  shape=dict(B=B, T=T, H=H, K=K, V=V, dtype=str(dtype)))
    # the walks compute their own maps (see the docstring)
    with keys_pass_off(kernel in WALKS):
        _run_variants(args, case, variants, config, x, res)
    print(f"wrote {res.path}")
    return 0


def _run_variants(args, case, variants, config, x, res) -> None:
    """Each variant: the mixer's module rendered with the kernel's edits, its forward (and, for a kernel of the
    backward, its backward) run and timed."""
    import mixforge as mf
    from benchmarks.compare import bench, fwd_bwd, kernel_profile
    from mixforge.codegen import emit
    from mixforge.codegen import ops as ops_mod

    kernel = args.kernel.split("/")[0]
    backward = kernel in BACKWARD
    leaves = [t for t in x.values() if t.is_floating_point()]
    base, dy = None, None
    real, real_ahead = ops_mod.render_module, vars(emit.Emitter)["_loads_ahead"]   # the staticmethod itself
    for name in (args.variants.split(",") if args.variants else variants):
        edits = variants[name]
        if edits is IN_STEP:
            emit.Emitter._loads_ahead = staticmethod(lambda o: False)
        else:
            ops_mod.render_module = lambda plan, edits=edits: patch_kernel(real(plan), kernel, edits)
        try:
            ops = mf.compile(case.mixer)
        finally:
            ops_mod.render_module, emit.Emitter._loads_ahead = real, real_ahead
        run = lambda ops=ops: getattr(ops, case.path)(config=config, **x)[0]  # noqa: E731
        row = dict(variant=name)
        t0 = time.time()
        if backward:
            for t_ in leaves:
                t_.requires_grad_(True)
            y = run()
            dy = torch.randn_like(y) if dy is None else dy
            out = torch.cat([g.float().flatten() for g in torch.autograd.grad(y, leaves, dy)])
            timed = fwd_bwd(run, leaves, dy)
        else:
            with torch.no_grad():
                out = run().float()
            timed = torch.no_grad()(run)
        row["compile_s"] = round(time.time() - t0, 2)
        base = out if base is None else base
        # the edit took: every variant but the baseline and SAME_OUTPUT changes the output (the gradients)
        row["rel_to_baseline"] = ((out - base).norm() / base.norm()).item()
        if args.smoke:
            row["ran"] = True
        else:
            row["fwd_bwd_ms" if backward else "fwd_ms"] = bench(timed)
            row["profile_us"] = kernel_profile(timed)
            row["kernel_us"] = sum(us for k, us, _ in row["profile_us"] if kernel in k)
        res.add(row, hide=("profile_us",))


if __name__ == "__main__":
    raise SystemExit(main())
