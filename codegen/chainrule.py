"""Feature gradients -> raw gradients, with the generated chain kernel (templates/chain.py.jinja).

For every Input and Param r: dr = sum over maps f of df * (d f / d r), the
partials derived by sympy (derivatives.py). Reductions the kernel cannot do
in place, finished here (deterministic sums, no atomics): parameters sum the
per-program partials over row blocks; grouped inputs of several groupings
sum the heads of each group (of one grouping, the kernel does: one program
per group walks its heads).
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import next_pow2
from .core import CallContext, FeatureGrads
from .epilogue import row_block
from .launch import launch
from .recurrent import MIN_TILE


def raw_grads(ctx: CallContext, fg: FeatureGrads, dfg: Optional[torch.Tensor],
              do: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradient of every operand by name, each in its operand's dtype and shape."""
    sh, plan = ctx.shapes, ctx.plan
    NT = sh.B * sh.T
    BK, BV = max(MIN_TILE, next_pow2(sh.K)), max(MIN_TILE, next_pow2(sh.V))
    f32 = dict(dtype=torch.float32, device=ctx.device)
    writes = ctx.module.CHAIN_WRITES if NT > 0 else ()
    # a feature that is one input as-is hands its gradient over (already in the input's dtype from the
    # chunked backward; a cast here for the recurrent path's fp32 ones)
    direct = {name: getattr(fg, "d" + f) for f, name in plan.passthrough.items()}
    # grouped inputs of one grouping: each program sums the heads of a group (R of them) into the group's
    # gradient; of several groupings, per head (R = 1), summed below
    groups = {sh.group(o.name) for o in plan.operands if o.is_input and o.grouped and o.name not in direct}
    R = sh.H // groups.pop() if len(groups) == 1 else 1
    # a program walks R heads: R times fewer rows each (down to 16), so that programs stay as many and as
    # short as with one head each where the rows allow (mamba2 at K = 64, one group of 16 heads: 512
    # programs of 16 heads x 64 rows otherwise)
    BT = max(16, row_block(max(BK, BV), NT) // R)
    NB = -(-NT // BT)
    outs = {}
    for o in plan.operands:
        if o.name in direct:
            continue
        x = ctx.tensors[o.name]
        new = torch.empty if o.name in writes else torch.zeros   # the kernel writes every element it owns
        if o.is_input and o.grouped:      # the heads of a group summed by the kernel (R > 1) or below
            outs[o.name] = new(sh.B, sh.T, sh.H // R, sh.K, **f32)
        elif o.is_input:
            outs[o.name] = new(x.shape, dtype=x.dtype, device=x.device)
        else:                             # one partial sum per row block
            outs[o.name] = new((NB,) + tuple(x.shape), **f32)
    if writes:
        launch(ctx.module.chain_kernel, (NB, sh.H // R))(
            *ctx.kernel_args(), *(outs[o.name] for o in plan.operands if o.name in outs),
            fg.dfq, fg.dfk, fg.dfv, fg.dfa, dfg, fg.dw, do, ctx.positions, ctx.scale, NT,
            H=sh.H, K=sh.K, V=sh.V, BT=BT, BK=BK, BV=BV, R=R)
    grads = {}
    for o in plan.operands:
        if o.name in direct:
            grads[o.name] = direct[o.name].to(ctx.tensors[o.name].dtype)
            continue
        x, g = ctx.tensors[o.name], outs[o.name]
        if o.is_input and o.grouped and R == 1:
            G = sh.group(o.name)
            g = g.view(sh.B, sh.T, G, sh.H // G, sh.K).sum(3)
        elif not o.is_input:
            g = g.sum(0)
        grads[o.name] = g.to(x.dtype)
    return grads
