"""The epilogue y = fg * Norm(o) and its backward, generated per mixer (templates/epilogue.py.jinja).

Rowwise over [B*T, H, V]: one program per (block of rows, head) holds all of
V (the norm needs the whole row). Without a gate and a norm, y is o in the
inputs' dtype and no kernel runs: a path may then store o in that dtype
itself (the chunk path does), which is returned as y without a copy, and the
output gradient dy goes to the path's backward as it is (16-bit for 16-bit
inputs; the paths' kernels read do in any float dtype and compute in fp32).
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import next_pow2
from .core import CallContext
from .launch import launch

#: elements of one [rows, V] tile a program aims for
TILE_ELEMENTS = 4096


def row_block(width: int, rows: int) -> int:
    """Rows per program for tiles of `width` columns (a power of two, 16 to 128, at most what exists)."""
    BT = max(16, min(128, TILE_ELEMENTS // next_pow2(width)))
    return max(16, min(BT, next_pow2(rows)))


def forward(ctx: CallContext, o: torch.Tensor) -> torch.Tensor:
    sh = ctx.shapes
    if not ctx.plan.has_epilogue:
        # o is a fresh buffer of the path: y is o, converted only if the path computed it in fp32
        return o if o.dtype == sh.dtype else o.to(sh.dtype)
    y = torch.empty(sh.B, sh.T, sh.H, sh.V, dtype=sh.dtype, device=ctx.device)
    NT = sh.B * sh.T
    BT, BV = row_block(sh.V, NT), max(16, next_pow2(sh.V))
    launch(ctx.module.epilogue_fwd_kernel, (-(-NT // BT), sh.H))(
        *ctx.kernel_args(), o, y, ctx.positions, NT, H=sh.H, V=sh.V, BT=BT, BV=BV)
    return y


def backward(ctx: CallContext, o: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(do, dfg): the core's output gradient and the gate's feature gradient (None without a gate).

    do is fp32, or, without an epilogue, dy itself (contiguous, in the output's dtype): no conversion pass.
    """
    sh = ctx.shapes
    if not ctx.plan.has_epilogue:
        return dy, None
    do = torch.empty(sh.B, sh.T, sh.H, sh.V, dtype=torch.float32, device=ctx.device)
    dfg = torch.empty_like(do) if ctx.plan.gate else None
    NT = sh.B * sh.T
    BT, BV = row_block(sh.V, NT), max(16, next_pow2(sh.V))
    launch(ctx.module.epilogue_bwd_kernel, (-(-NT // BT), sh.H))(
        *ctx.kernel_args(), o, dy, do, dfg, ctx.positions, NT, H=sh.H, V=sh.V, BT=BT, BV=BV)
    return do, dfg
