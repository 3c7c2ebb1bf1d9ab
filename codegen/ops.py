"""MixerOps: a mixer's generated kernels behind a validated, differentiable call API.

    ops = MixerOps(mixer)                     # plan -> rendered module -> on-disk cache -> imported
    y, S_T = ops.chunk(q=..., k=..., initial_state=None, output_final_state=True, cu_seqlens=None)
    y, S_T = ops.recurrent(...)               # same arguments, same results
    y_t, state = ops.step(state=state, q=..., ...)   # one decoding step
    print(ops.source("recurrent_fwd"))        # the generated Triton

Every call is validated by `spec.shapes.resolve_call` before any kernel runs.
Inputs are made contiguous (any strides are accepted); fp32, fp16 and bf16
inputs give outputs in that dtype; states are fp32 [N, H, K, V] (a pair with
z [N, H, K] for normalize mixers). The forward and backward run as the
torch.library custom ops of custom_ops.py, so gradients reach every Input,
Param and the initial state, and torch.compile traces a call as one node.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from ..spec.errors import CallError
from ..spec.mixer import Mixer, load_mixer
from ..spec.reference import default_scale
from ..spec.shapes import check_state, layout, resolve_call
from . import cache, custom_ops, epilogue, recurrent
from .config import ConfigLookup, KernelConfig, ShapeKey, heuristic_config
from .plan import build_plan
from .render import kernel_source, render_module

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_warned_no_chunk = False


def _chunk_available() -> bool:
    """Whether codegen/chunk.py provides the path interface; else .chunk runs the recurrent path."""
    try:
        from . import chunk
    except ImportError:
        return False
    return hasattr(chunk, "forward") and hasattr(chunk, "backward")


class _Declared:
    """What spec.shapes reads from a Mixer, computed once: `Mixer.operands` walks sympy trees on
    every access, which torch.compile cannot trace; this snapshot it can."""

    def __init__(self, mixer: Mixer):
        self.name, self.normalize = mixer.name, mixer.normalize
        self.operands, self.inputs = mixer.operands, mixer.inputs


class MixerOps:
    """The compiled ops of one mixer. Build with `mixforge.compile(mixer)`."""

    def __init__(self, mixer: "Mixer | str", config_lookup: Optional[ConfigLookup] = None):
        self.mixer = load_mixer(mixer)
        self._declared = _Declared(self.mixer)
        self.plan = build_plan(self.mixer)
        self._source = render_module(self.plan)
        self.module, self.module_path, self.cache_hit = cache.load_module(self.mixer.name, self._source)
        self.key = f"{self.mixer.name}-{cache.source_hash(self._source)}"
        self.config_lookup = config_lookup
        custom_ops.register(custom_ops.Compiled(self.key, self.mixer, self.plan, self.module))

    def __repr__(self) -> str:
        return f"MixerOps({self.mixer.name!r}, module={str(self.module_path)!r})"

    # ------------------------------------------------------------------ sources
    def source(self, name: Optional[str] = None) -> str:
        """The generated Triton: the whole module (name None or "module"), or one kernel ("recurrent_fwd")."""
        if name in (None, "module"):
            return self._source
        return kernel_source(self._source, name)

    # ------------------------------------------------------------------ configs
    def config(self, kernel: str, shapes) -> KernelConfig:
        """The tile config for `kernel` at these shapes: the lookup's answer, else the heuristic."""
        if self.config_lookup is not None:
            key = ShapeKey(kernel, _DTYPE_NAMES[shapes.dtype], shapes.B, shapes.T, shapes.H, shapes.K, shapes.V)
            found = self.config_lookup(self.mixer, key)
            if found is not None:
                return found
        return heuristic_config(kernel, shapes.K, shapes.V, _DTYPE_NAMES[shapes.dtype],
                                interpret=shapes.device.type != "cuda", decay=self.plan.decay)

    # ------------------------------------------------------------------ calls
    def chunk(self, *, initial_state=None, output_final_state: bool = False, cu_seqlens=None, scale=None,
              config: Optional[KernelConfig] = None, **tensors):
        """(y [B, T, H, V], final state or None) by the chunked-parallel kernels."""
        global _warned_no_chunk
        path = "chunk"
        if not _chunk_available():
            path = "recurrent"
            if not _warned_no_chunk:
                _warned_no_chunk = True
                warnings.warn("mixforge: the chunked kernels are not available yet; ops.chunk runs the "
                              "recurrent kernels (same results, slower)", stacklevel=2)
        return self._call(path, initial_state, output_final_state, cu_seqlens, scale, config, tensors)

    def recurrent(self, *, initial_state=None, output_final_state: bool = False, cu_seqlens=None, scale=None,
                  config: Optional[KernelConfig] = None, **tensors):
        """(y [B, T, H, V], final state or None) by the token-by-token kernels."""
        return self._call("recurrent", initial_state, output_final_state, cu_seqlens, scale, config, tensors)

    def _call(self, path, initial_state, output_final_state, cu_seqlens, scale, config, tensors):
        shapes = resolve_call(self._declared, tensors, initial_state=initial_state, cu_seqlens=cu_seqlens)
        scale = default_scale(self.mixer, shapes.K, scale)
        _check_flag("output_final_state", output_final_state)
        _check_config(config)
        _check_runnable(shapes.device)
        S0, z0 = _split_state(self.plan.normalize, initial_state)
        cu = cu_seqlens.to(torch.int32) if cu_seqlens is not None else None
        if shapes.T == 0:
            return self._empty_call(shapes, S0, z0, output_final_state)
        positions = _positions(shapes, cu) if self.plan.uses_t else None
        fwd = config or self.config(f"{path}_fwd", shapes)
        bwd = config or self.config(f"{path}_bwd", shapes)
        xs = [tensors[n].contiguous() for n in self.plan.operand_names]
        y, _, S_T, z_T = torch.ops.mixforge.mixer_fwd(
            self.key, path, custom_ops.config_key(fwd), custom_ops.config_key(bwd), xs, S0, z0, cu, positions,
            scale, bool(output_final_state))
        if not output_final_state:
            return y, None
        return y, ((S_T, z_T) if self.plan.normalize else S_T)

    def _empty_call(self, shapes, S0, z0, output_final_state):
        """T = 0: no token, so y is empty and the final state is the initial one."""
        y = torch.empty(shapes.B, 0, shapes.H, shapes.V, dtype=shapes.dtype, device=shapes.device)
        if not output_final_state:
            return y, None
        f32 = dict(dtype=torch.float32, device=shapes.device)
        S = S0.clone() if S0 is not None else torch.zeros(shapes.N, shapes.H, shapes.K, shapes.V, **f32)
        if not self.plan.normalize:
            return y, S
        return y, (S, z0.clone() if z0 is not None else torch.zeros(shapes.N, shapes.H, shapes.K, **f32))

    def step(self, *, state=None, position=None, scale=None, config: Optional[KernelConfig] = None, **tensors):
        """One decoding step: (y [B, H, V], new state). Not differentiable (decoding).

        Inputs have no T axis: per key [B, H, K] (grouped [B, G, K]), per
        value [B, H, V], scalar [B, H]; parameters as always. `state` is the
        fp32 state [B, H, K, V] (normalize: the pair (S, z [B, H, K])), None
        for zeros; it is not modified. `position` (int, or an integer tensor
        [B]) is the token's position t in its sequence, required by mixers
        whose maps use t. A prefill `ops.chunk(..., output_final_state=True)`
        followed by steps gives the same outputs as one pass over all tokens.
        """
        rows = _step_rows(self._declared, tensors)
        shapes = resolve_call(self._declared, rows)
        N, H, K, V = shapes.B, shapes.H, shapes.K, shapes.V
        if state is not None:
            check_state("state", state, self._declared, N, H, K, V, shapes.device, (torch.float32,))
        scale = default_scale(self.mixer, K, scale)
        _check_config(config)
        _check_runnable(shapes.device)
        f32 = dict(dtype=torch.float32, device=shapes.device)
        S, z = _split_state(self.plan.normalize, state)
        S = S if S is not None else torch.zeros(N, H, K, V, **f32)
        if self.plan.normalize and z is None:
            z = torch.zeros(N, H, K, **f32)
        positions = _step_positions(position, N, shapes.device) if self.plan.uses_t else None
        xs = [rows[n].contiguous() for n in self.plan.operand_names]
        ctx = custom_ops.make_context(custom_ops.compiled(self.key), xs, S, z, None, positions, scale, True)
        cfg = config or self.config("step", shapes)
        with torch.no_grad():
            o, S_new, z_new = recurrent.step(ctx, cfg, positions)
            y = epilogue.forward(ctx, o.view(N, 1, H, V)).view(N, H, V)
        return y, ((S_new, z_new) if self.plan.normalize else S_new)


# ---------------------------------------------------------------------------- call helpers

def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise CallError(f"{name}: expected True or False, got {value!r}")


def _check_config(config) -> None:
    if config is not None and not isinstance(config, KernelConfig):
        raise CallError(f"config: expected a mixforge KernelConfig or None, got {type(config).__name__}")


def _check_runnable(device: torch.device) -> None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise CallError(f"tensors on {device}: the kernels need a CUDA device, or TRITON_INTERPRET=1 set "
                        "before mixforge is imported (Triton's interpreter, for CPU tensors)")


def _split_state(normalize: bool, state):
    """(S, z) as contiguous fp32 tensors (None when absent); the state was validated already."""
    if state is None:
        return None, None
    if normalize:
        return state[0].contiguous(), state[1].contiguous()
    return state.contiguous(), None


def _positions(shapes, cu: Optional[torch.Tensor]) -> torch.Tensor:
    """t of every row of [B*T]: int32, restarting at each sequence of a varlen batch."""
    t = torch.arange(shapes.T, dtype=torch.int32, device=shapes.device)
    if cu is None:
        return t.repeat(shapes.B)
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=shapes.T)
    return t - starts


def _step_rows(mixer: Mixer, tensors: dict) -> dict:
    """Step inputs without a T axis as [B, 1, ...] views (the layout resolve_call checks)."""
    rows = dict(tensors)
    for o in mixer.inputs:
        x = tensors.get(o.name)
        if isinstance(x, torch.Tensor):
            axes = [a for a in layout(o) if a != "T"]
            if x.dim() != len(axes):
                raise CallError(f"{o.name}: a step takes one token, expected {len(axes)} dims "
                                f"[{', '.join(axes)}], got shape {list(x.shape)}")
            rows[o.name] = x.unsqueeze(1)
    return rows


def _step_positions(position, B: int, device) -> torch.Tensor:
    if position is None:
        raise CallError("position: this mixer's maps use t, so step needs the token's position "
                        "(an int, or an integer tensor [B])")
    if isinstance(position, bool) or not isinstance(position, (int, torch.Tensor)):
        raise CallError(f"position: expected an int or an integer tensor [B], got {type(position).__name__}")
    if isinstance(position, int):
        if position < 0:
            raise CallError(f"position: expected a position >= 0, got {position}")
        return torch.full((B,), position, dtype=torch.int32, device=device)
    if position.dtype not in (torch.int32, torch.int64) or tuple(position.shape) not in ((B,), ()):
        raise CallError(f"position: expected an integer tensor of shape [{B}], got {position.dtype} "
                        f"{list(position.shape)}")
    return position.to(device=device, dtype=torch.int32).expand(B).contiguous()


def compile(mixer: "Mixer | str", config_lookup: Optional[ConfigLookup] = None) -> MixerOps:
    """Generate (or reuse from the cache), load and wrap a mixer's kernels."""
    return MixerOps(mixer, config_lookup)


__all__ = ["MixerOps", "compile"]
