"""The compiled ops as torch.library custom ops, so torch.compile traces them as opaque nodes.

Two ops serve every mixer and both paths:

    mixforge::mixer_fwd(key, path, config, bwd_config, tensors, S0, z0, cu_seqlens, positions, scale,
                        output_final_state) -> (y, o, S_T, z_T)
    mixforge::mixer_bwd(key, path, config, tensors, S0, z0, cu_seqlens, positions, scale, o, dy, dS_T, dz_T)
                        -> [d tensor for each tensor] + [dS0, dz0]

`key` names a compiled mixer registered here (its plan and generated module);
`path` is "recurrent" or "chunk", the module providing forward/backward
(core.py). Tensors absent from an output are returned empty (custom ops
return no None). `o` (fp32, before gate and norm) is kept for the epilogue's
backward; nothing else is kept: each path's backward recomputes what it
needs. `register_fake` gives shapes for tracing; `register_autograd` makes
the forward differentiable with mixer_bwd, path-agnostic:

    epilogue backward (dy -> do, dfg) -> path backward (-> FeatureGrads) -> chain rule (-> raw grads)

`call` is what ops calls. It takes the ops only while torch.compile traces; in
eager mode it runs their bodies through an autograd.Function (`_EagerCall`),
since the dispatch layers of a torch.library op cost the host more per call
than the kernels' launches do.
"""
from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..spec.mixer import Mixer
from ..spec.shapes import CallShapes
from . import chainrule, epilogue, launch
from .config import KernelConfig
from .core import CallContext
from .plan import KernelPlan

PATHS = ("recurrent", "chunk")


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What the ops need to run a mixer's kernels, registered under `key`."""

    key: str
    mixer: Mixer
    plan: KernelPlan
    module: ModuleType


_COMPILED: dict[str, Compiled] = {}


def register(compiled: Compiled) -> None:
    _COMPILED[compiled.key] = compiled


def compiled(key: str) -> Compiled:
    try:
        return _COMPILED[key]
    except KeyError:
        raise RuntimeError(f"no compiled mixer {key!r} in this process: call mixforge.compile first") from None


def path_module(path: str) -> ModuleType:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return importlib.import_module(f"{__package__}.{path}")


# ---------------------------------------------------------------------------- configs as op arguments

_FIELDS = ("chunk", "sub_chunk", "BK", "BV", "num_warps", "num_stages", "strategy")


def config_key(c: KernelConfig) -> str:
    """A KernelConfig as a custom-op argument (a string: op schemas take no dataclasses)."""
    return f"{c.chunk},{c.sub_chunk},{c.BK},{c.BV},{c.num_warps},{c.num_stages},{c.strategy}"


def parse_config(key: str) -> KernelConfig:
    values = dict(zip(_FIELDS, key.split(",")))
    ints = {k: (None if v == "None" else int(v)) for k, v in values.items() if k != "strategy"}
    return KernelConfig(**ints, strategy=values["strategy"])


# ---------------------------------------------------------------------------- the call context

def call_shapes(plan: KernelPlan, xs: list[torch.Tensor], cu_seqlens: Optional[torch.Tensor]) -> CallShapes:
    """Sizes read off tensors that ops has validated (also works on fake tensors: no data access)."""
    dims: dict[str, int] = {}
    for o, x in zip(plan.operands, xs):
        dims.update((a, n) for a, n in zip(o.axes, x.shape) if a != "G")
    first = next(x for o, x in zip(plan.operands, xs) if o.is_input)
    groups = tuple((o.name, x.shape[2]) for o, x in zip(plan.operands, xs) if o.grouped)
    B, T = dims["B"], dims["T"]
    N = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
    return CallShapes(B, T, dims["H"], dims.get("K", 1), dims.get("V", 1), N, groups, first.dtype, first.device,
                      cu_seqlens is not None)


def make_context(c: Compiled, xs, S0, z0, cu_seqlens, positions, scale, output_final_state) -> CallContext:
    return CallContext(c.mixer, c.plan, c.module, dict(zip(c.plan.operand_names, xs)),
                       call_shapes(c.plan, xs, cu_seqlens), scale, S0, z0, cu_seqlens, output_final_state, positions)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0, dtype=torch.float32)


def _given(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """None for an absent tensor: None itself, or the empty stand-in for an output that was not produced."""
    return x if x is not None and x.numel() > 0 else None


# ---------------------------------------------------------------------------- forward

def forward_impl(key: str, path: str, config: str, tensors: list[torch.Tensor], S0: Optional[torch.Tensor],
                 z0: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                 scale: float, output_final_state: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixer_fwd's body: (y, o, S_T, z_T)."""
    c = compiled(key)
    ctx = make_context(c, tensors, S0, z0, cu_seqlens, positions, scale, output_final_state)
    core = path_module(path).forward(ctx, parse_config(config))
    y = epilogue.forward(ctx, core.o)
    first = tensors[0]
    return (y, core.o if c.plan.has_epilogue else _empty(first),
            core.S_T if core.S_T is not None else _empty(first),
            core.z_T if core.z_T is not None else _empty(first))


@torch.library.custom_op("mixforge::mixer_fwd", mutates_args=())
def mixer_fwd(key: str, path: str, config: str, bwd_config: str, tensors: list[torch.Tensor],
              S0: Optional[torch.Tensor], z0: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
              positions: Optional[torch.Tensor], scale: float, output_final_state: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward_impl(key, path, config, tensors, S0, z0, cu_seqlens, positions, scale, output_final_state)


@mixer_fwd.register_fake
def _(key, path, config, bwd_config, tensors, S0, z0, cu_seqlens, positions, scale, output_final_state):
    c = compiled(key)
    sh = call_shapes(c.plan, tensors, cu_seqlens)
    first = tensors[0]
    y = first.new_empty(sh.B, sh.T, sh.H, sh.V, dtype=sh.dtype)
    o = first.new_empty(sh.B, sh.T, sh.H, sh.V, dtype=torch.float32) if c.plan.has_epilogue else _empty(first)
    want = output_final_state
    S_T = first.new_empty(sh.N, sh.H, sh.K, sh.V, dtype=torch.float32) if want else _empty(first)
    z_T = first.new_empty(sh.N, sh.H, sh.K, dtype=torch.float32) if want and c.plan.normalize else _empty(first)
    return y, o, S_T, z_T


# ---------------------------------------------------------------------------- backward

def backward_impl(key: str, path: str, config: str, tensors: list[torch.Tensor], S0: Optional[torch.Tensor],
                  z0: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                  scale: float, o: torch.Tensor, dy: Optional[torch.Tensor], dS_T: Optional[torch.Tensor],
                  dz_T: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """mixer_bwd's body: [d tensor for each tensor] + [dS0, dz0] (empty where absent)."""
    c = compiled(key)
    ctx = make_context(c, tensors, S0, z0, cu_seqlens, positions, scale, False)
    sh = ctx.shapes
    if dy is None:   # only the final state was used
        dy = torch.zeros(sh.B, sh.T, sh.H, sh.V, dtype=sh.dtype, device=sh.device)
    # incoming gradients can have any strides (the gradient of a sum is an expanded tensor)
    dy = dy.contiguous()
    dS_T = dS_T.contiguous() if dS_T is not None else None
    dz_T = dz_T.contiguous() if dz_T is not None else None
    do, dfg = epilogue.backward(ctx, o, dy)
    fg = path_module(path).backward(ctx, parse_config(config), do, dS_T, dz_T)
    grads = chainrule.raw_grads(ctx, fg, dfg, do if c.plan.term_params else None)
    first = tensors[0]
    return [grads[n] for n in c.plan.operand_names] + [
        fg.dS0 if fg.dS0 is not None else _empty(first), fg.dz0 if fg.dz0 is not None else _empty(first)]


@torch.library.custom_op("mixforge::mixer_bwd", mutates_args=())
def mixer_bwd(key: str, path: str, config: str, tensors: list[torch.Tensor], S0: Optional[torch.Tensor],
              z0: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], positions: Optional[torch.Tensor],
              scale: float, o: torch.Tensor, dy: Optional[torch.Tensor], dS_T: Optional[torch.Tensor],
              dz_T: Optional[torch.Tensor]) -> list[torch.Tensor]:
    return backward_impl(key, path, config, tensors, S0, z0, cu_seqlens, positions, scale, o, dy, dS_T, dz_T)


@mixer_bwd.register_fake
def _(key, path, config, tensors, S0, z0, cu_seqlens, positions, scale, o, dy, dS_T, dz_T):
    first = tensors[0]
    return [torch.empty_like(x) for x in tensors] + [
        torch.empty_like(S0) if S0 is not None else _empty(first),
        torch.empty_like(z0) if z0 is not None else _empty(first)]


def _save(ctx, key, path, bwd_config, scale, tensors, S0, z0, cu_seqlens, positions, o) -> None:
    ctx.key, ctx.path, ctx.config, ctx.scale, ctx.n = key, path, bwd_config, scale, len(tensors)
    ctx.save_for_backward(*tensors, S0, z0, cu_seqlens, positions, o)


def _saved_backward(ctx, run_bwd, dy, dS_T, dz_T):
    """(d tensors, dS0, dz0) from what _save kept, by run_bwd (mixer_bwd or its body)."""
    saved = ctx.saved_tensors
    n = ctx.n
    tensors, (S0, z0, cu_seqlens, positions, o) = list(saved[:n]), saved[n:]
    out = run_bwd(ctx.key, ctx.path, ctx.config, tensors, S0, z0, cu_seqlens, positions, ctx.scale, o, dy,
                  _given(dS_T), _given(dz_T))
    return list(out[:n]), (out[n] if S0 is not None else None), (out[n + 1] if z0 is not None else None)


def _setup_context(ctx, inputs, output):
    key, path, config, bwd_config, tensors, S0, z0, cu_seqlens, positions, scale, output_final_state = inputs
    _save(ctx, key, path, bwd_config, scale, tensors, S0, z0, cu_seqlens, positions, output[1])


def _backward(ctx, dy, do_unused, dS_T, dz_T):
    dx, dS0, dz0 = _saved_backward(ctx, torch.ops.mixforge.mixer_bwd, dy, dS_T, dz_T)
    return None, None, None, None, dx, dS0, dz0, None, None, None, None


mixer_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- compiling ahead

#: the kinds of call whose kernels this process compiled ahead (see compile_first)
_COMPILED_AHEAD: set = set()


def compiles_ahead(device: torch.device) -> bool:
    """Whether calls on `device` compile their kernels (a GPU, not Triton's interpreter)."""
    return device.type == "cuda" and not launch.interpreting()


def compile_first(key: str, path: str, config: str, bwd_config: str, tensors: list[torch.Tensor],
                  S0: Optional[torch.Tensor], z0: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                  positions: Optional[torch.Tensor], scale: float, output_final_state: bool, grad: bool) -> None:
    """Before the first call of its kind on a GPU, compile its kernels in parallel threads (launch.py).

    The dry run is this call's forward and, where a gradient is wanted, its backward, at its own sizes (what
    the host decides from the sizes, the kernels' variants included, is then exactly the call's). A kind is
    what selects the kernels short of the sizes: mixer, path, configs, dtype, device and the optional
    tensors. A later call of a known kind that Triton specializes differently (an integer argument newly
    divisible by 16) compiles as it launches, as every call did before. The dry backward takes no gradient
    of the final state: a loss that uses it compiles that variant at its backward."""
    first = tensors[0]
    if not compiles_ahead(first.device):
        return
    kind = (key, path, config, bwd_config if grad else None, first.dtype, first.device, cu_seqlens is not None,
            S0 is not None, z0 is not None, output_final_state)
    if kind in _COMPILED_AHEAD:
        return
    _COMPILED_AHEAD.add(kind)

    def dry_run():
        y, o, _, _ = forward_impl(key, path, config, tensors, S0, z0, cu_seqlens, positions, scale,
                                  output_final_state)
        if grad:
            backward_impl(key, path, bwd_config, tensors, S0, z0, cu_seqlens, positions, scale, o,
                          torch.empty_like(y), None, None)

    with torch.no_grad():
        launch.compile_ahead(dry_run, first.device)


# ---------------------------------------------------------------------------- the eager call

class _EagerCall(torch.autograd.Function):
    """mixer_fwd with its registered autograd, without torch.library's dispatch: the same bodies, saved
    tensors and backward. The op's Python layers (schema defaults, pytree flattening of inputs and
    gradients, the aliasing check, the dynamo guard around each body) run on the host per call."""

    @staticmethod
    def forward(ctx, key, path, config, bwd_config, S0, z0, cu_seqlens, positions, scale, output_final_state,
                *tensors):
        y, o, S_T, z_T = forward_impl(key, path, config, list(tensors), S0, z0, cu_seqlens, positions, scale,
                                      output_final_state)
        _save(ctx, key, path, bwd_config, scale, tensors, S0, z0, cu_seqlens, positions, o)
        ctx.mark_non_differentiable(o)
        # an unused output's gradient arrives as None, not as zeros to read (the final state's is
        # [N, H, K, V] fp32)
        ctx.set_materialize_grads(False)
        return y, o, S_T, z_T

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, do_unused, dS_T, dz_T):
        dx, dS0, dz0 = _saved_backward(ctx, backward_impl, dy, dS_T, dz_T)
        return (None, None, None, None, dS0, dz0, None, None, None, None, *dx)


def call(key: str, path: str, config: str, bwd_config: str, tensors: list[torch.Tensor],
         S0: Optional[torch.Tensor], z0: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
         positions: Optional[torch.Tensor], scale: float, output_final_state: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixer_fwd's (y, o, S_T, z_T), differentiable: the custom op while torch.compile traces (one opaque
    node), the same bodies through an autograd.Function in eager mode, and the forward alone where no
    gradient is wanted."""
    args = (key, path, config, bwd_config)
    rest = (cu_seqlens, positions, scale, output_final_state)
    if torch.compiler.is_compiling():
        return torch.ops.mixforge.mixer_fwd(*args, tensors, S0, z0, *rest)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*tensors, S0, z0))
    compile_first(*args, tensors, S0, z0, *rest, grad)
    if grad:
        return _EagerCall.apply(*args, S0, z0, *rest, *tensors)
    return forward_impl(key, path, config, tensors, S0, z0, *rest)
