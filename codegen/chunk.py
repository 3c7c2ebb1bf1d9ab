"""The chunked-parallel path: launches the kernels of templates/chunk.py.jinja.

    forward(ctx, config) -> CoreForward
    backward(ctx, config, do, dS_T, dz_T) -> FeatureGrads

The math is ALGORITHMS.md §3-4. Two strategies (config.strategy):

* fused:    one program per (V-block, sequence, head) walks the chunks of its
            sequence in order with the state in registers (forward), and in
            reverse with the state gradient in registers (backward).
* two_pass: a sequential pass writes every chunk's start state S^(c) (backward:
            every dS^(c+1)) to HBM, then one program per (V-block, chunk, head)
            computes its chunk, all chunks in parallel.

Every backward first recomputes S^(c) with the states kernel (nothing is kept
from the forward). Partial sums over V-blocks (dfq, dfk, dL, dw) go to fp32
buffers [NV, ...] and are summed afterwards: deterministic.

Valid configs (`check_config`): chunk % sub_chunk == 0, chunk, sub_chunk and
BV powers of two, BK None (all of K, padded to a power of two >= 16); on the
GPU sub_chunk, BV >= 16 (tl.dot's minimum).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .config import KernelConfig, next_pow2

#: the [BC, BC, BK] broadcast of a diagonal block is used up to this many elements, a column loop beyond;
#: None: decide by size. Tests set it to exercise both.
DIAG_LOOP: Optional[bool] = None
DIAG_3D_MAX = 4096


@dataclasses.dataclass
class ChunkCall:
    """Everything the launches need; built from a CallContext (or directly by the tests)."""

    module: Any
    map_args: list                      # values for the `maps.args()` hole
    B: int
    T: int
    H: int
    K: int
    V: int
    N: int
    scale: float
    decay: str                          # none | constant | scalar | key
    inclusive: bool
    normalize: bool
    bonus: bool
    cu_seqlens: Optional[torch.Tensor]  # int32 [N + 1] or None
    S0: Optional[torch.Tensor]
    z0: Optional[torch.Tensor]
    output_final_state: bool
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def from_ctx(cls, ctx) -> "ChunkCall":
        sh, plan = ctx.shapes, ctx.plan
        cu = ctx.cu_seqlens
        if cu is not None and cu.dtype != torch.int32:
            cu = cu.to(torch.int32)
        return cls(ctx.module, ctx.kernel_args(), sh.B, sh.T, sh.H, sh.K, sh.V, sh.N, float(ctx.scale),
                   plan.decay, plan.inclusive, plan.normalize, plan.bonus, cu, ctx.S0, ctx.z0,
                   ctx.output_final_state, sh.dtype, sh.device)


def check_config(config: KernelConfig, K: int, V: int, gpu: bool = True) -> None:
    """Raise ValueError for a config the chunked kernels cannot run."""
    C, c = config.chunk, config.sub_chunk
    pow2 = lambda n: n >= 1 and (n & (n - 1)) == 0  # noqa: E731
    if config.strategy not in ("fused", "two_pass"):
        raise ValueError(f"strategy must be 'fused' or 'two_pass', got {config.strategy!r}")
    if not (pow2(C) and pow2(c) and pow2(config.BV)):
        raise ValueError(f"chunk ({C}), sub_chunk ({c}) and BV ({config.BV}) must be powers of two")
    if C % c:
        raise ValueError(f"chunk ({C}) must be a multiple of sub_chunk ({c})")
    if config.BK is not None and config.BK < K:
        raise ValueError(f"BK = {config.BK} < K = {K}: the chunked kernels keep all of K per program")
    if gpu and (c < 16 or config.BV < 16):
        raise ValueError(f"sub_chunk ({c}) and BV ({config.BV}) must be >= 16 for tl.dot on the GPU")


# --------------------------------------------------------------------------- helpers

def _dot_types(dtype: torch.dtype):
    import triton.language as tl

    if dtype == torch.float16:
        return tl.float16, "tf32"
    if dtype == torch.bfloat16:
        return tl.bfloat16, "tf32"
    return tl.float32, "ieee"


@dataclasses.dataclass
class _Geom:
    BT: int
    BC: int
    BK: int
    BV: int
    NV: int
    NC_total: int                       # chunks over all sequences
    coff: Optional[torch.Tensor]        # int32 [N + 1] first global chunk of each sequence (varlen)
    cseq: Optional[torch.Tensor]        # int32 [NC_total] the sequence of each chunk (varlen)
    diag_loop: bool
    dot_dt: Any
    prec: str
    num_warps: int
    num_stages: int


def _geometry(c: ChunkCall, config: KernelConfig) -> _Geom:
    check_config(config, c.K, c.V, gpu=c.device.type == "cuda")
    BT, BC = config.chunk, config.sub_chunk
    BK = max(16, next_pow2(c.K))
    BV = max(16, min(config.BV, next_pow2(c.V))) if c.device.type == "cuda" else min(config.BV, next_pow2(c.V))
    NV = -(-c.V // BV)
    shift = 0 if c.inclusive else 1   # exclusive mixers walk T + 1 positions (k, v, fa one token later)
    if c.cu_seqlens is None:
        NC_total, coff, cseq = c.B * (-(-(c.T + shift) // BT)), None, None
    else:
        lens = (c.cu_seqlens[1:] - c.cu_seqlens[:-1]).long() + shift
        nc = (lens + BT - 1) // BT
        coff = torch.zeros(c.N + 1, dtype=torch.int32, device=c.device)
        coff[1:] = torch.cumsum(nc, 0).to(torch.int32)
        NC_total = int(coff[-1].item())
        cseq = torch.repeat_interleave(torch.arange(c.N, device=c.device, dtype=torch.int32), nc)
    diag_loop = DIAG_LOOP if DIAG_LOOP is not None else BC * BC * BK > DIAG_3D_MAX
    dot_dt, prec = _dot_types(c.dtype)
    return _Geom(BT, BC, BK, BV, NV, NC_total, coff, cseq, diag_loop, dot_dt, prec,
                 config.num_warps, config.num_stages)


def _dummy(c: ChunkCall) -> torch.Tensor:
    return torch.empty(1, dtype=torch.float32, device=c.device)


def _launch_opts(g: _Geom, interpret: bool) -> dict:
    return {} if interpret else {"num_warps": g.num_warps, "num_stages": g.num_stages}


def _interpret(c: ChunkCall) -> bool:
    return c.device.type != "cuda"


def _seq_args(c: ChunkCall, g: _Geom) -> list:
    d = _dummy(c)
    return [c.cu_seqlens if c.cu_seqlens is not None else d,
            g.coff if g.coff is not None else d,
            g.cseq if g.cseq is not None else d]


def _states(c: ChunkCall, g: _Geom, store_final: bool, store_final_x: bool = False):
    """S^(c) (and z^(c)) of every chunk, the final state, and (store_final_x) the final state without the
    last token's own k v^T, which the decay gradient's final-state term uses."""
    H, K, V, N = c.H, c.K, c.V, c.N
    dev, d = c.device, _dummy(c)
    Sbuf = torch.empty(max(g.NC_total, 1), H, K, V, dtype=torch.float32, device=dev)
    zbuf = torch.empty(max(g.NC_total, 1), H, K, dtype=torch.float32, device=dev) if c.normalize else d
    ST = torch.empty(N, H, K, V, dtype=torch.float32, device=dev) if store_final else d
    zT = torch.empty(N, H, K, dtype=torch.float32, device=dev) if (store_final and c.normalize) else d
    STx = torch.zeros(N, H, K, V, dtype=torch.float32, device=dev) if store_final_x else d
    zTx = torch.zeros(N, H, K, dtype=torch.float32, device=dev) if (store_final_x and c.normalize) else d
    c.module.chunk_states_kernel[(g.NV, N * H)](
        *c.map_args,
        c.S0 if c.S0 is not None else d, c.z0 if c.z0 is not None else d, ST, zT, STx, zTx, Sbuf, zbuf,
        *_seq_args(c, g),
        c.T, c.scale,
        H=H, K=K, V=V, BT=g.BT, BC=g.BC, BK=g.BK, BV=g.BV,
        USE_S0=c.S0 is not None, STORE_ST=store_final, STORE_STX=store_final_x,
        VARLEN=c.cu_seqlens is not None, DOT_DT=g.dot_dt, PREC=g.prec, **_launch_opts(g, _interpret(c)),
    )
    if store_final_x:
        return Sbuf, zbuf, STx, zTx
    return Sbuf, zbuf, ST, zT


def _fwd_kernel(c: ChunkCall, g: _Geom, fused: bool, o, on, den, ST, zT, Sbuf, zbuf, save_on: bool):
    d = _dummy(c)
    H, K, V, N = c.H, c.K, c.V, c.N
    grid = (g.NV, (N if fused else g.NC_total) * H)
    if grid[1] == 0:
        return
    c.module.chunk_fwd_kernel[grid](
        *c.map_args,
        o, on, den, c.S0 if c.S0 is not None else d, c.z0 if c.z0 is not None else d, ST, zT, Sbuf, zbuf,
        *_seq_args(c, g),
        c.T, c.scale,
        H=H, K=K, V=V, BT=g.BT, BC=g.BC, BK=g.BK, BV=g.BV,
        FUSED=fused, USE_S0=c.S0 is not None, STORE_ST=fused and c.output_final_state,
        VARLEN=c.cu_seqlens is not None, SAVE_ON=save_on, DIAG_LOOP=g.diag_loop,
        DOT_DT=g.dot_dt, PREC=g.prec, **_launch_opts(g, _interpret(c)),
    )


# --------------------------------------------------------------------------- forward

def run_forward(c: ChunkCall, config: KernelConfig):
    """(o fp32 [B,T,H,V], S_T or None, z_T or None)."""
    g = _geometry(c, config)
    B, T, H, K, V, N = c.B, c.T, c.H, c.K, c.V, c.N
    dev, d = c.device, _dummy(c)
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=dev)
    want = c.output_final_state
    if config.strategy == "fused":
        ST = torch.empty(N, H, K, V, dtype=torch.float32, device=dev) if want else d
        zT = torch.empty(N, H, K, dtype=torch.float32, device=dev) if (want and c.normalize) else d
        if B * T == 0 or N * H == 0:
            return o, _empty_final(c, want)[0], _empty_final(c, want)[1]
        _fwd_kernel(c, g, True, o, d, d, ST, zT, d, d, save_on=False)
    else:
        Sbuf, zbuf, ST, zT = _states(c, g, store_final=want)
        _fwd_kernel(c, g, False, o, d, d, d, d, Sbuf, zbuf, save_on=False)
    return o, (ST if want else None), (zT if (want and c.normalize) else None)


def _empty_final(c: ChunkCall, want: bool):
    if not want:
        return None, None
    S = c.S0.clone() if c.S0 is not None else torch.zeros(c.N, c.H, c.K, c.V, device=c.device)
    z = None
    if c.normalize:
        z = c.z0.clone() if c.z0 is not None else torch.zeros(c.N, c.H, c.K, device=c.device)
    return S, z


# --------------------------------------------------------------------------- backward

def run_backward(c: ChunkCall, config: KernelConfig, do: torch.Tensor, dS_T: Optional[torch.Tensor],
                 dz_T: Optional[torch.Tensor]) -> dict:
    """Feature gradients: dict with dfq, dfk, dfv, dfa, dw, dS0, dz0 (fp32)."""
    g = _geometry(c, config)
    B, T, H, K, V, N = c.B, c.T, c.H, c.K, c.V, c.N
    dev, d = c.device, _dummy(c)
    NTOK = B * T
    do = do.contiguous().float()
    use_dst = dS_T is not None or (c.normalize and dz_T is not None)
    if use_dst:
        dS_T = (dS_T if dS_T is not None else torch.zeros(N, H, K, V, device=dev)).contiguous().float()
        if c.normalize:
            dz_T = (dz_T if dz_T is not None else torch.zeros(N, H, K, device=dev)).contiguous().float()
    has_decay = c.decay != "none"
    # states S^(c), and the final state when the decay gradient needs rowsum(dS_T * S_T); the kernels leave
    # the last token's k v^T out of both sides of that term (it cancels exactly), see chunk_bwd_kernel
    need_final = use_dst and has_decay
    Sbuf, zbuf, STx, zTx = _states(c, g, store_final=False, store_final_x=need_final)

    den = dden = d
    if c.normalize:
        # o = num / den: the numerator's gradient is do / den, the denominator's dden = -(do . o_n) / den
        on = torch.empty(B, T, H, V, dtype=torch.float32, device=dev)
        den = torch.empty(B, T, H, dtype=torch.float32, device=dev)
        scratch = torch.empty(B, T, H, V, dtype=torch.float32, device=dev)
        _fwd_kernel(c, g, False, scratch, on, den, d, d, Sbuf, zbuf, save_on=True)
        dden = -(do * on).sum(-1) / den
        del scratch, on

    dq = torch.empty(g.NV, B, T, H, K, dtype=torch.float32, device=dev)
    lshape = (g.NV, B, T, H, K) if c.decay == "key" else (g.NV, B, T, H)
    # exclusive: dL, dk, dv of the shifted k side land on the key's own token; rows no program writes are 0
    alloc = torch.empty if c.inclusive else torch.zeros
    dk = alloc(g.NV, B, T, H, K, dtype=torch.float32, device=dev)
    dv = alloc(B, T, H, V, dtype=torch.float32, device=dev)
    dL = alloc(lshape, dtype=torch.float32, device=dev) if has_decay else d
    # exclusive with a bonus: the bonus's dk, dv stay on the q row's token, in their own buffers
    two = c.bonus and not c.inclusive
    dk2 = torch.empty(g.NV, B, T, H, K, dtype=torch.float32, device=dev) if two else d
    dv2 = torch.empty(B, T, H, V, dtype=torch.float32, device=dev) if two else d
    dS0 = torch.empty(N, H, K, V, dtype=torch.float32, device=dev)
    dz0 = torch.empty(N, H, K, dtype=torch.float32, device=dev) if c.normalize else d
    fused = config.strategy == "fused"
    n_prog = (N if fused else g.NC_total) * H
    dw = torch.zeros(g.NV, max(n_prog, 1), K, dtype=torch.float32, device=dev) if c.bonus else d
    dSbuf = dzbuf = d
    if not fused:
        dSbuf = torch.empty(max(g.NC_total, 1), H, K, V, dtype=torch.float32, device=dev)
        dzbuf = torch.empty(max(g.NC_total, 1), H, K, dtype=torch.float32, device=dev) if c.normalize else d
        c.module.chunk_dstates_kernel[(g.NV, N * H)](
            *c.map_args,
            do, den, dden, dS_T if use_dst else d, dz_T if (use_dst and c.normalize) else d,
            dS0, dz0, dSbuf, dzbuf,
            *_seq_args(c, g),
            c.T, c.scale,
            H=H, K=K, V=V, BT=g.BT, BC=g.BC, BK=g.BK, BV=g.BV,
            USE_DST=use_dst, VARLEN=c.cu_seqlens is not None, DOT_DT=g.dot_dt, PREC=g.prec,
            **_launch_opts(g, _interpret(c)),
        )
    if n_prog > 0:
        c.module.chunk_bwd_kernel[(g.NV, n_prog)](
            *c.map_args,
            do, den, dden, Sbuf, zbuf, dSbuf, dzbuf,
            dS_T if use_dst else d, dz_T if (use_dst and c.normalize) else d, dS0, dz0,
            dq, dk, dv, dL, dk2, dv2, dw,
            *_seq_args(c, g),
            c.T, c.scale, NTOK,
            H=H, K=K, V=V, BT=g.BT, BC=g.BC, BK=g.BK, BV=g.BV,
            FUSED=fused, USE_DST=use_dst, VARLEN=c.cu_seqlens is not None, DIAG_LOOP=g.diag_loop,
            DOT_DT=g.dot_dt, PREC=g.prec, **_launch_opts(g, _interpret(c)),
        )
    elif fused:  # no sequence at all
        dS0.copy_(dS_T if use_dst else torch.zeros_like(dS0))
        if c.normalize:
            dz0.copy_(dz_T if use_dst else torch.zeros_like(dz0))
    dfq = dq[0] if g.NV == 1 else dq.sum(0)
    dfk = dk[0] if g.NV == 1 else dk.sum(0)
    if two:
        dfk = dfk + (dk2[0] if g.NV == 1 else dk2.sum(0))
        dv = dv + dv2

    dfa = None
    if has_decay:
        if need_final:
            fin = (dS_T * STx).sum(-1)                      # [N, H, K]
            if c.normalize:
                fin = fin + dz_T * zTx
        else:
            fin = torch.zeros(N, H, K, device=dev)
        if c.decay != "key":
            fin = fin.sum(-1)
        fin = fin.contiguous()
        dfa = torch.empty(lshape[1:], dtype=torch.float32, device=dev)
        if N * H > 0 and NTOK > 0:
            c.module.chunk_dfa_kernel[(N * H,)](
                dL, fin, dfa, c.cu_seqlens if c.cu_seqlens is not None else d,
                c.T, NTOK, g.NV,
                H=H, K=K, BT=g.BT, BK=g.BK, VARLEN=c.cu_seqlens is not None,
            )
        if c.decay == "constant":
            dfa = dfa.sum((0, 1))
    dw_out = None
    if c.bonus:
        dw_out = dw[:, :n_prog].reshape(g.NV, -1, H, K).sum((0, 1))
    return dict(dfq=dfq, dfk=dfk, dfv=dv, dfa=dfa, dw=dw_out,
                dS0=dS0 if c.S0 is not None else None,
                dz0=dz0 if (c.normalize and c.S0 is not None) else None)


# --------------------------------------------------------------------------- the path interface

def forward(ctx, config: KernelConfig):
    from .core import CoreForward

    o, S_T, z_T = run_forward(ChunkCall.from_ctx(ctx), config)
    return CoreForward(o=o, S_T=S_T, z_T=z_T)


def backward(ctx, config: KernelConfig, do, dS_T, dz_T):
    from .core import FeatureGrads

    return FeatureGrads(**run_backward(ChunkCall.from_ctx(ctx), config, do, dS_T, dz_T))
