"""The recurrent path: token-by-token kernels (templates/recurrent.py.jinja), and the decoding step.

    forward(ctx, config) -> CoreForward
    backward(ctx, config, do, dS_T, dz_T) -> FeatureGrads
    step(ctx, config, position, S_new=None, z_new=None) -> (o [B, H, V], S_new, z_new)

One program per (sequence x head, value block) keeps its [K, BV] slice of
the state in registers (all of K, padded to a power of two; BV from the
config). Sums over V that the backward needs (dfq, dfk, the decay and bonus
gradients, dz0) are written per value block and added here: deterministic.
A per-key decay's factors exp(fa) are computed before the walks, once per
element (`decay_factors`), not inside them, where the map would run in the
state's layout, repeated for every column a thread holds.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import KernelConfig, next_pow2
from .core import CallContext, CoreForward, FeatureGrads
from .epilogue import row_block
from .launch import launch

#: the smallest tile: Triton's layouts want at least 16 elements along a dimension
MIN_TILE = 16


def tiles(K: int, V: int, config: KernelConfig) -> tuple[int, int, int]:
    """(BK, BV, NV): all of K in one tile, V in blocks of BV."""
    BK = max(MIN_TILE, next_pow2(K))
    BV = max(MIN_TILE, min(next_pow2(config.BV), next_pow2(V)))
    return BK, BV, -(-V // BV)


def _launch_opts(config: KernelConfig, device: torch.device) -> dict:
    return {} if device.type != "cuda" else {"num_warps": config.num_warps, "num_stages": config.num_stages}


def decay_factors(ctx: CallContext) -> Optional[torch.Tensor]:
    """exp(fa) [B*T, H, K] fp32 of a per-key decay, for the walks (recurrent_decay_kernel); else None."""
    sh = ctx.shapes
    if ctx.plan.decay != "key":
        return None
    NT = sh.B * sh.T
    ea = torch.empty(NT, sh.H, sh.K, dtype=torch.float32, device=ctx.device)
    if NT:
        BK = max(MIN_TILE, next_pow2(sh.K))
        BT = row_block(BK, NT)
        launch(ctx.module.recurrent_decay_kernel, (-(-NT // BT), sh.H))(
            *ctx.kernel_args(), ea, ctx.positions, NT, H=sh.H, K=sh.K, BT=BT, BK=BK)
    return ea


def forward(ctx: CallContext, config: KernelConfig) -> CoreForward:
    sh, plan = ctx.shapes, ctx.plan
    BK, BV, NV = tiles(sh.K, sh.V, config)
    f32 = dict(dtype=torch.float32, device=ctx.device)
    o = torch.empty(sh.B, sh.T, sh.H, sh.V, **f32)
    S_T = torch.empty(sh.N, sh.H, sh.K, sh.V, **f32) if ctx.output_final_state else None
    z_T = torch.empty(sh.N, sh.H, sh.K, **f32) if ctx.output_final_state and plan.normalize else None
    launch(ctx.module.recurrent_fwd_kernel, (sh.N * sh.H, NV))(
        *ctx.kernel_args(), o, ctx.S0, ctx.z0, S_T, z_T, decay_factors(ctx), ctx.cu_seqlens, ctx.scale, sh.T,
        H=sh.H, K=sh.K, V=sh.V, BK=BK, BV=BV,
        USE_S0=ctx.S0 is not None, STORE_ST=ctx.output_final_state, VARLEN=ctx.cu_seqlens is not None,
        **_launch_opts(config, ctx.device))
    return CoreForward(o, S_T, z_T)


def backward(ctx: CallContext, config: KernelConfig, do: torch.Tensor, dS_T: Optional[torch.Tensor],
             dz_T: Optional[torch.Tensor]) -> FeatureGrads:
    sh, plan = ctx.shapes, ctx.plan
    B, T, H, K, V, N = sh.B, sh.T, sh.H, sh.K, sh.V, sh.N
    BK, BV, NV = tiles(K, V, config)
    NT = B * T
    f32 = dict(dtype=torch.float32, device=ctx.device)
    # [NV, ...]: each value block's share of a sum over V
    dq = torch.empty(NV, NT, H, K, **f32)
    dlq = torch.empty(NV, NT, H, K, **f32) if plan.decay != "none" else None   # the decay's q-terms
    dk = torch.empty(NV, NT, H, K, **f32)
    dv = torch.empty(B, T, H, V, **f32)
    da = None   # the decay gradient per token: [.., K] per key, summed over K in the kernel otherwise
    if plan.decay == "key":
        da = torch.empty(NV, NT, H, K, **f32)
    elif plan.decay != "none":
        da = torch.empty(NV, NT, H, **f32)
    dw = torch.empty(NV, N, H, K, **f32) if plan.bonus else None
    dS0 = torch.empty(N, H, K, V, **f32) if ctx.S0 is not None else None
    dz0 = torch.empty(NV, N, H, K, **f32) if ctx.S0 is not None and plan.normalize else None
    aux = torch.empty(NV, NT, H, 2, **f32) if plan.normalize else None   # den and this block's dden per token
    if dS_T is None and dz_T is not None:
        dS_T = torch.zeros(N, H, K, V, **f32)
    if dz_T is None and dS_T is not None and plan.normalize:
        dz_T = torch.zeros(N, H, K, **f32)
    launch(ctx.module.recurrent_bwd_kernel, (N * H, NV))(
        # the factors again rather than kept from the forward: one pass over a, instead of an fp32
        # [B*T, H, K] tensor held between the passes
        *ctx.kernel_args(), do, ctx.S0, ctx.z0, dS_T, dz_T, decay_factors(ctx), ctx.cu_seqlens,
        dq, dlq, dk, dv, da, dw, dS0, dz0, aux, ctx.scale, T, NT,
        H=H, K=K, V=V, BK=BK, BV=BV,
        USE_S0=ctx.S0 is not None, USE_DST=dS_T is not None, VARLEN=ctx.cu_seqlens is not None,
        **_launch_opts(config, ctx.device))
    dfa = None
    if plan.decay == "key":
        dfa = da.sum(0).view(B, T, H, K)
    elif plan.decay == "scalar":
        dfa = da.sum(0).view(B, T, H)
    elif plan.decay == "constant":
        dfa = da.sum((0, 1))
    return FeatureGrads(
        dfq=dq.sum(0).view(B, T, H, K), dfk=dk.sum(0).view(B, T, H, K), dfv=dv, dfa=dfa,
        dw=dw.sum((0, 1)) if dw is not None else None, dS0=dS0,
        dz0=dz0.sum(0) if dz0 is not None else None)


def step(ctx: CallContext, config: KernelConfig, position: Optional[torch.Tensor], *,
         S_new: Optional[torch.Tensor] = None, z_new: Optional[torch.Tensor] = None):
    """One decoding step: ctx.tensors hold one token per sequence ([B, 1, H, ...] views), ctx.S0 the state.

    Returns (o [B, H, V], S_new, z_new). o is fp32 when the mixer has an epilogue (gate or norm: it
    reads o), else already y in the inputs' dtype (the kernel's store rounds, as `.to(dtype)` would).
    S_new and z_new are allocated unless given. S_new may be ctx.S0 itself (an in-place update: each
    program reads its own [K, BV] tile of the state before it writes it, and no other program touches
    that tile); z_new may not be ctx.z0, since every value block reads z and only the first writes it.
    """
    sh, plan = ctx.shapes, ctx.plan
    BK, BV, NV = tiles(sh.K, sh.V, config)
    f32 = dict(dtype=torch.float32, device=ctx.device)
    o = torch.empty(sh.B, sh.H, sh.V, dtype=torch.float32 if plan.has_epilogue else sh.dtype, device=ctx.device)
    if S_new is None:
        S_new = torch.empty(sh.B, sh.H, sh.K, sh.V, **f32)
    if plan.normalize and z_new is None:
        z_new = torch.empty(sh.B, sh.H, sh.K, **f32)
    launch(ctx.module.step_kernel, (sh.B * sh.H, NV))(
        *ctx.kernel_args(), o, ctx.S0, ctx.z0, S_new, z_new, position, ctx.scale,
        H=sh.H, K=sh.K, V=sh.V, BK=BK, BV=BV, **_launch_opts(config, ctx.device))
    return o, S_new, z_new
