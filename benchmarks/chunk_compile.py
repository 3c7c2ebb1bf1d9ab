"""Compile a mixer's chunk kernels for a GPU target without a GPU: compile time, registers, spills, shared memory.

    python -m benchmarks.chunk_compile [--mixers gla,mamba2] [--configs 64,64,8,2 32,64,8,2] [--arch 90]
    python -m benchmarks.chunk_compile --mixers scalar_decay --kernels chunk_states_kernel,chunk_dstates_kernel \
        --configs 64,32,4,3 --state-tile 32 --pre        # a split walk as at B = 1 (state_tiles, SPLIT_LAUNCH)
    python -m benchmarks.chunk_compile --mixers gla,rwkv6 --kernels chunk_bwd_kernel --K 256 --V 256 \
        --configs 32,64,8,1 --key-blocks 0 128 64       # the backward in key blocks (config.BK)
    python -m benchmarks.chunk_compile --mixers gla --kernels chunk_out_kernel --K 256 --V 256 \
        --configs 32,128,4,2 --key-blocks 128 64        # the two-pass forward's outputs in key blocks

Uses Triton's own compiler and the ptxas bundled with it (no driver needed), so the resource report of
every kernel a config launches can be read on a CPU machine before spending GPU time. Mixers: the compare's
cases (gla, linear_attention, scalar_decay, mamba2) and every zoo mixer by its name. Each config is
chunk,BV,num_warps,num_stages (sub_chunk is not used by the chunk kernels). Inputs are taken as bf16.

Each line also counts, in the PTX, the 16-byte async copies (`cp.async.cg`: tile loads the software pipeliner
prefetches), narrower ones (`cp.async.ca`), synchronous global loads (`ld.global`) and wgmma instructions: a
tile that a serial walk loads with ld.global every step waits a global-memory latency each time.
"""
from __future__ import annotations

import argparse
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mixforge.codegen.plan import build_plan
from mixforge.codegen.render import render_module

FLOAT_ARGS = {"scale"}
INT_ARGS = {"T", "NTOK", "NCH", "NVC", "NTOKH"}
#: the kernels that take a key block (config.BK); --key-blocks lists the blocks to compile them for
KEY_BLOCK_KERNELS = ("chunk_bwd_kernel", "chunk_dv_kernel", "chunk_out_kernel")


def load_module(mixer):
    import importlib.util
    import sys
    import tempfile
    from pathlib import Path

    src = render_module(build_plan(mixer))
    d = Path(tempfile.mkdtemp(prefix="mf-compile-"))
    path = d / f"{mixer.name}_chunk_compile.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod


def signature(fn, plan, constexprs: dict, in_ty: str = "bf16", state_ty: str = "bf16"):
    sig = {}
    grouped = set(plan.grouped)
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.startswith("G_") and name[2:] in grouped:
            sig[name] = "constexpr"
        elif name.startswith("x_"):
            op = next(o for o in plan.operands if o.pointer == name)
            sig[name] = f"*{in_ty}" if op.is_input else "*fp32"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in INT_ARGS:
            sig[name] = "i32"
        elif name in ("Sbuf_ptr", "dSbuf_ptr", "kd_ptr", "qe_ptr", "kdbuf_ptr"):   # chunk_keys_kernel's tiles: the state dtype
            sig[name] = f"*{state_ty}"
        elif name in ("cu_ptr", "coff_ptr", "cseq_ptr"):
            sig[name] = "*i32"
        else:
            sig[name] = "*fp32"
    return sig


def compile_one(mod, plan, kernel: str, consts: dict, num_warps: int, num_stages: int, arch: int):
    fn = getattr(mod, kernel)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    for g in plan.grouped:
        consts[f"G_{g}"] = 1
    sig = signature(fn, plan, consts)
    # what the JIT specializes at run time: 16-byte aligned pointers, integers divisible by 16 (T = 2048)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or sig[n] == "i32"}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    t = time.time()
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                        "num_stages": num_stages})
    dt = time.time() - t
    md = k.metadata
    ptx = k.asm.get("ptx", "")
    sass_regs = None
    try:
        from triton.tools.disasm import get_sass  # noqa: F401
    except Exception:
        pass
    # registers and spills come from ptxas' report (--verbose is not on): count from the cubin's attributes
    n_regs, n_spills = getattr(k, "n_regs", None), getattr(k, "n_spills", None)
    return dict(kernel=kernel, seconds=dt, shared=getattr(md, "shared", None), n_regs=n_regs, n_spills=n_spills,
                ptx_lines=ptx.count("\n"), wgmma="wgmma" in ptx, mma="mma.sync" in ptx, sass_regs=sass_regs,
                ptx=ptx, loads=load_counts(ptx))


def load_counts(ptx: str) -> dict:
    """How the kernel moves its tiles: pipelined 16-byte async copies, narrower ones, synchronous loads."""
    import re

    return {name: len(re.findall(pattern, ptx)) for name, pattern in
            (("cp.async.cg", r"cp\.async\.cg"), ("cp.async.ca", r"cp\.async\.ca"), ("ld.global", r"ld\.global"),
             ("wgmma", r"wgmma\.mma_async"))}


def ptxas_report(ptx: str, arch: int) -> str:
    """Registers / spills / smem as ptxas reports them for one PTX module."""
    import os
    import subprocess
    import tempfile

    from pathlib import Path

    import triton.backends.nvidia as nv

    ptxas = str(Path(nv.__path__[0]) / "bin" / ("ptxas-blackwell" if arch >= 90 else "ptxas"))
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        open(p, "w").write(ptx)
        r = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", p, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
        return " ".join(line.strip() for line in (r.stderr + r.stdout).splitlines() if "registers" in line or "spill" in line or "rror" in line)[:600]


def main(argv=None):
    from benchmarks.compare import GLA_CORE, LINEAR, MAMBA2, SCALAR_DECAY

    import mixforge as mf

    # the compare's cases by their names, then any zoo mixer
    mixers = {**mf.zoo.ALL, "gla": GLA_CORE, "linear_attention": LINEAR, "scalar_decay": SCALAR_DECAY,
              "mamba2": MAMBA2}
    ap = argparse.ArgumentParser()
    ap.add_argument("--mixers", default="gla")
    ap.add_argument("--configs", nargs="*", default=["64,64,8,2"])
    ap.add_argument("--kernels", default="chunk_fwd_kernel,chunk_states_kernel,chunk_dstates_kernel,chunk_bwd_kernel")
    ap.add_argument("--two-pass", action="store_true")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--state-tile", default=None,
                    help="the states kernels' BK = BV, or BKxBV (a split walk's tiles; default: all of K, the "
                         "config's BV)")
    ap.add_argument("--pre", action="store_true", help="the walks read the keys pass's buffers (PRE)")
    ap.add_argument("--fact", action="store_true",
                    help="the states walk reads the pass's decay factors only (FACT: the forward, a decay that is not "
                         "per key)")
    ap.add_argument("--key-blocks", type=int, nargs="*", default=[0],
                    help="the key-block kernels' blocks to compile (config.BK; 0: all of K in one tile)")
    args = ap.parse_args(argv)
    for name in args.mixers.split(","):
        m = mixers[name]
        plan = build_plan(m)
        mod = load_module(m)
        for c in args.configs:
            BT, BV, W, S = map(int, c.split(","))
            consts = dict(H=16, K=args.K, V=args.V, BT=BT, BK=max(16, triton.next_power_of_2(args.K)), BV=BV,
                          LOG2_BT=BT.bit_length() - 1, FUSED=not args.two_pass, USE_S0=False, STORE_ST=False,
                          STORE_STX=False, VARLEN=False, SAVE_ON=False, USE_DST=False, STORE_DS0=True,
                          DOT_DT=tl.bfloat16, PREC="tf32", PRE=args.pre, QE=args.pre,
                          FACT=args.fact)
            for kern in args.kernels.split(","):
                blocked = kern in KEY_BLOCK_KERNELS
                for kb in (args.key_blocks if blocked else [0]):
                    kconsts = dict(consts)
                    if args.state_tile and kern in ("chunk_states_kernel", "chunk_dstates_kernel"):
                        sbk, _, sbv = args.state_tile.partition("x")
                        kconsts.update(BK=int(sbk), BV=int(sbv or sbk))
                    if blocked:
                        kb = min(kb or consts["BK"], consts["BK"])
                        kconsts.update(BK=kb, NK=-(-args.K // kb))
                        if kern in ("chunk_dv_kernel", "chunk_out_kernel") and kb == consts["BK"]:
                            continue            # only launched for key blocks
                    r = compile_one(mod, plan, kern, kconsts, W, S, args.arch)
                    rep = ptxas_report(r["ptx"], args.arch)
                    label = f"{kern}/BK{kb}" if blocked else kern
                    print(f"{name:16s} {c:12s} {label:22s} {r['seconds']:6.1f}s smem={r['shared']} "
                          f"wgmma={r['wgmma']} mma={r['mma']} {r['loads']} | {rep}", flush=True)


if __name__ == "__main__":
    main()
