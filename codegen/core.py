"""The objects a path (recurrent.py, chunk.py) receives and returns: the path interface.

A path module provides

    forward(ctx: CallContext, config: KernelConfig) -> CoreForward
    backward(ctx: CallContext, config: KernelConfig, do, dS_T, dz_T) -> FeatureGrads

(do fp32 [B, T, H, V]; dS_T, dz_T fp32 or None; all contiguous) and ops.py does everything around it: validation, contiguity, the epilogue
(gate and norm), the chain rule to raw gradients, autograd and torch.library
registration. A path computes in *feature space* only: `o` before gate and
norm (bonus and denominator included), and the gradients of the maps.

Layouts (all contiguous; B*T rows, FlashAttention-style varlen has B = 1):
raw per-key inputs [B, T, H|G, K], per-value [B, T, H, V], scalar [B, T, H];
parameters [H, K], [H, V], [H]; states fp32 [N, H, K, V] and z [N, H, K].
"""
from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import TYPE_CHECKING, Optional

import torch

from ..spec.mixer import Mixer
from ..spec.shapes import CallShapes

if TYPE_CHECKING:  # plan imports spec only; kept lazy so this module stays a leaf
    from .plan import KernelPlan


@dataclasses.dataclass
class CallContext:
    """One call's data, as every kernel launch of a path needs it."""

    mixer: Mixer
    plan: "KernelPlan"
    module: ModuleType                   # the generated module; kernels are `<name>_kernel` attributes
    tensors: dict[str, torch.Tensor]     # raw inputs and parameters by declared name, contiguous
    shapes: CallShapes
    scale: float                         # ignored by normalize mixers (it cancels)
    S0: Optional[torch.Tensor]           # fp32 [N, H, K, V] or None (zeros)
    z0: Optional[torch.Tensor]           # fp32 [N, H, K] (normalize only) or None
    cu_seqlens: Optional[torch.Tensor]   # int32 [N + 1] or None
    output_final_state: bool
    positions: Optional[torch.Tensor]    # int32 [B * T]: t of every token in its sequence (plan.uses_t), else None

    def kernel_args(self) -> list:
        """The values for the `maps.args()` hole of every kernel, in plan order.

        Raw tensors first, then, for every grouped input, its group count G
        (a `tl.constexpr` named `G_<name>` in the kernel).
        """
        args: list = [self.tensors[name] for name in self.plan.operand_names]
        args += [self.shapes.group(name) for name in self.plan.grouped]
        return args

    @property
    def rows(self) -> int:
        """B * T: the token rows of every per-token tensor."""
        return self.shapes.B * self.shapes.T

    @property
    def device(self) -> torch.device:
        return self.shapes.device


@dataclasses.dataclass
class CoreForward:
    """What a path's forward returns."""

    o: torch.Tensor                      # fp32 [B, T, H, V]: before gate and norm, bonus and denominator included
    S_T: Optional[torch.Tensor] = None   # fp32 [N, H, K, V] when ctx.output_final_state
    z_T: Optional[torch.Tensor] = None   # fp32 [N, H, K] when normalize and ctx.output_final_state


@dataclasses.dataclass
class FeatureGrads:
    """What a path's backward returns: gradients of the maps, fp32 (the chunked path writes dfq, dfk,
    dfv of a passthrough feature, KernelPlan.passthrough, in the inputs' dtype: they are final).

    dfa has the decay's shape class: [B, T, H, K] (per key), [B, T, H]
    (scalar), [H] (constant, summed over every token of every sequence);
    None when the mixer has no decay. dw is the bonus weight's gradient [H, K]
    (summed over tokens), None without a bonus. dS0/dz0 are None when the
    call had no initial state.
    """

    dfq: torch.Tensor                    # [B, T, H, K]
    dfk: torch.Tensor                    # [B, T, H, K]
    dfv: torch.Tensor                    # [B, T, H, V]
    dfa: Optional[torch.Tensor] = None
    dw: Optional[torch.Tensor] = None
    dS0: Optional[torch.Tensor] = None   # [N, H, K, V]
    dz0: Optional[torch.Tensor] = None   # [N, H, K]
