"""MixerOps: a mixer's generated kernels behind a validated, differentiable call API.

    ops = MixerOps(mixer)                     # plan -> rendered module -> on-disk cache -> imported
    y, S_T = ops.chunk(q=..., k=..., initial_state=None, output_final_state=True, cu_seqlens=None)
    y, S_T = ops.recurrent(...)               # same arguments, same results
    y_t, state = ops.step(state=state, q=..., ...)   # one decoding step
    dec = ops.decoder(state=state, **token); y_t = dec(**token)   # a decoding loop (codegen/decode.py)
    print(ops.source("recurrent_fwd"))        # the generated Triton

Every call is validated by `spec.shapes.resolve_call` before any kernel runs.
Inputs are made contiguous (any strides are accepted); fp32, fp16 and bf16
inputs give outputs in that dtype; states are fp32 [N, H, K, V] (a pair with
z [N, H, K] for normalize mixers). The forward and backward are the
torch.library custom ops of custom_ops.py, so gradients reach every Input,
Param and the initial state, and torch.compile traces a call as one node; in
eager mode their bodies run without the op dispatch (custom_ops.call).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Optional

import torch

from ..spec.errors import CallError
from ..spec.mixer import Mixer, load_mixer
from ..spec.reference import default_scale
from ..spec.shapes import check_state, layout, resolve_call
from . import cache, custom_ops, epilogue, recurrent
from .config import ConfigLookup, KernelConfig, ShapeKey, heuristic_config
from .core import CallContext
from .launch import interpreting
from .plan import build_plan
from .render import kernel_source, render_module

if TYPE_CHECKING:
    from .decode import Decoder

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_warned_no_chunk = False


def _chunk_available() -> bool:
    """Whether codegen/chunk.py provides the path interface; else .chunk runs the recurrent path."""
    try:
        from . import chunk
    except ImportError:
        return False
    return hasattr(chunk, "forward") and hasattr(chunk, "backward")


# MixerOps.key + instance id -> (mixer, lookup): lets the traced call ask for a config with primitives only
_LOOKUPS: dict[str, tuple] = {}


#: the mark torch._dynamo.assume_constant_result puts on a function (test_layer_compile checks that it still does)
DYNAMO_CONSTANT_MARK = "_dynamo_marked_constant"


def _assume_constant(fn):
    """torch._dynamo.assume_constant_result without importing torch._dynamo where nothing has yet.

    Importing it takes 1.3 s on a CPU machine and more on a fresh GPU one, on the first call of every
    process, and an eager call never needs it; torch.compile imports it before it traces. So the mark the
    decorator sets is set here directly, the decorator used only where dynamo is already loaded."""
    import sys

    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None and hasattr(dynamo, "assume_constant_result"):
        return dynamo.assume_constant_result(fn)
    setattr(fn, DYNAMO_CONSTANT_MARK, True)
    return fn


@_assume_constant
def _looked_up(lookup_id: str, kernel: str, dtype: str, B: int, T: int, H: int, K: int, V: int):
    """The lookup's answer as a tuple (or None). Under torch.compile it runs once while tracing and is
    baked into the graph, which needs strings and ints in and out: a Mixer is no constant to dynamo."""
    mixer, lookup = _LOOKUPS[lookup_id]
    c = lookup(mixer, ShapeKey(kernel, dtype, B, T, H, K, V))
    return None if c is None else tuple(c.to_dict().values())


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
        self._lookup_id = f"{self.key}@{id(self)}"
        if config_lookup is not None:
            _LOOKUPS[self._lookup_id] = (self.mixer, config_lookup)
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
        """The tile config for `kernel` at these shapes: the lookup's answer, else the heuristic.

        While torch.compile traces, B and T may be symbolic and choosing a bucket
        would guard on them, so a traced call asks the lookup with B = T = -1 (the
        tuner's lookup then takes its bucket nearest to T = 4096, B*H = 64; every
        tuned config is valid at every length, only its speed depends on the bucket).
        """
        # sizes per sequence: a varlen batch (B = 1, T packed) asks as N sequences of its mean length, the
        # dense shape a config is tuned and bucketed at
        T_seq = shapes.T // max(shapes.N, 1) if shapes.varlen else shapes.T
        if self.config_lookup is not None:
            B, T = (-1, -1) if torch.compiler.is_compiling() else (shapes.N, T_seq)
            found = _looked_up(self._lookup_id, kernel, _DTYPE_NAMES[shapes.dtype], B, T, shapes.H, shapes.K,
                               shapes.V)
            if found is not None:
                return KernelConfig(*found)
        sizes = {} if torch.compiler.is_compiling() else dict(NH=shapes.N * shapes.H, T=T_seq)
        return heuristic_config(kernel, shapes.K, shapes.V, _DTYPE_NAMES[shapes.dtype],
                                interpret=shapes.device.type != "cuda", decay=self.plan.decay, **sizes)

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
        y, _, S_T, z_T = custom_ops.call(
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

        A call validates its arguments once per layout (names, shapes, dtypes and
        devices of the tensors and the state, scale, config): a repeated call with
        the same layout skips the checks it passed before. For a decoding loop, see
        `decoder` (static buffers, the state updated in place, a CUDA graph).
        """
        lay = self._step_layout(tensors, state, scale, config)
        sh = lay.shapes
        N, H, K, V = sh.B, sh.H, sh.K, sh.V
        if not lay.cuda:
            _check_runnable(sh.device)
        S, z = _split_state(self.plan.normalize, state)
        if S is None:
            S = torch.zeros(N, H, K, V, dtype=torch.float32, device=sh.device)
        if self.plan.normalize and z is None:
            z = torch.zeros(N, H, K, dtype=torch.float32, device=sh.device)
        positions = _step_positions(position, N, sh.device) if self.plan.uses_t else None
        xs = [tensors[n].contiguous().unsqueeze(1) if row else tensors[n].contiguous() for n, row in lay.operands]
        ctx = lay.context(xs, S, z, positions)
        cfg = config or self._step_config(lay)
        with torch.no_grad():
            o, S_new, z_new = recurrent.step(ctx, cfg, positions)
            y = epilogue.forward(ctx, o.view(N, 1, H, V)).view(N, H, V) if self.plan.has_epilogue else o
        return y, ((S_new, z_new) if self.plan.normalize else S_new)

    def decoder(self, *, state=None, position=None, scale=None, config: Optional[KernelConfig] = None,
                graph: Optional[bool] = None, **tensors) -> "Decoder":
        """A decoding loop's step: static buffers, the state updated in place, one CUDA graph per step.

            dec = ops.decoder(state=S, position=P, **token)   # shapes, dtypes, device, parameters
            for _ in range(n):
                y = dec(**token)     # y [B, H, V]; dec.state advanced in place; dec.position += 1

        See codegen/decode.py (`Decoder`) for the arguments, reset, load_state and run.
        """
        from .decode import Decoder

        return Decoder(self, tensors, state=state, position=position, scale=scale, config=config, graph=graph)

    def _step_layout(self, tensors: dict, state, scale, config) -> "_StepLayout":
        """The validated layout of a step call: from the cache when this layout passed the checks before."""
        key = _step_key(tensors, state, scale, config)
        layouts = self.__dict__.setdefault("_step_layouts", {})
        lay = layouts.get(key) if key is not None else None
        if lay is not None:
            return lay
        rows = _step_rows(self._declared, tensors)
        shapes = resolve_call(self._declared, rows)
        N, H, K, V = shapes.B, shapes.H, shapes.K, shapes.V
        if state is not None:
            check_state("state", state, self._declared, N, H, K, V, shapes.device, (torch.float32,))
        scale = default_scale(self.mixer, K, scale)
        _check_config(config)
        _check_runnable(shapes.device)
        lay = _StepLayout(custom_ops.compiled(self.key), shapes, scale, frozenset(o.name for o in self.mixer.inputs),
                          shapes.device.type == "cuda")
        if key is not None:
            if len(layouts) >= _STEP_LAYOUTS:
                layouts.clear()
            layouts[key] = lay
        return lay

    def _step_config(self, lay: "_StepLayout") -> KernelConfig:
        """As `config("step", shapes)`, asking the lookup on every call (it memoizes, and forgets after a
        tune) but building the heuristic fallback once per layout."""
        if self.config_lookup is not None:
            found = self.config_lookup(self.mixer, lay.shape_key)
            if found is not None:
                return found
        return lay.heuristic(self)


#: step layouts remembered per MixerOps (a full cache starts over)
_STEP_LAYOUTS = 64


def _step_key(tensors: dict, state, scale, config):
    """What a step call's validation depends on, hashable; None when the call is unusual (not all
    tensors, an unhashable option): such calls are validated every time."""
    try:
        sig = tuple((n, x.shape, x.dtype, x.device) for n, x in tensors.items() if isinstance(x, torch.Tensor))
        if len(sig) != len(tensors):
            return None
        if state is None:
            st = None
        elif isinstance(state, torch.Tensor):
            st = (state.shape, state.dtype, state.device)
        elif isinstance(state, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in state):
            st = tuple((x.shape, x.dtype, x.device) for x in state)
        else:
            return None
        if config is not None and not isinstance(config, KernelConfig):
            return None
        key = (sig, st, type(scale), scale, config)
        hash(key)
        return key
    except TypeError:
        return None


class _StepLayout:
    """A step call's validated layout and what follows from it alone."""

    __slots__ = ("compiled", "shapes", "scale", "operands", "cuda", "shape_key", "_heuristic")

    def __init__(self, compiled, shapes, scale: float, rows: frozenset, cuda: bool):
        self.compiled, self.shapes, self.scale, self.cuda = compiled, shapes, scale, cuda
        #: (name, is a per-token input: given without the T axis) in plan order
        self.operands = tuple((n, n in rows) for n in compiled.plan.operand_names)
        sh = shapes
        self.shape_key = ShapeKey("step", _DTYPE_NAMES[sh.dtype], sh.B, sh.T, sh.H, sh.K, sh.V)
        self._heuristic = None

    def heuristic(self, ops: "MixerOps") -> KernelConfig:
        if self._heuristic is None:
            sh = self.shapes
            self._heuristic = heuristic_config("step", sh.K, sh.V, _DTYPE_NAMES[sh.dtype],
                                               interpret=sh.device.type != "cuda", decay=ops.plan.decay)
        return self._heuristic

    def context(self, xs, S, z, positions) -> CallContext:
        """The CallContext of a step (what custom_ops.make_context builds, without re-reading shapes)."""
        c = self.compiled
        return CallContext(c.mixer, c.plan, c.module, dict(zip(c.plan.operand_names, xs)), self.shapes, self.scale,
                           S, z, None, True, positions)


# ---------------------------------------------------------------------------- call helpers

def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise CallError(f"{name}: expected True or False, got {value!r}")


def _check_config(config) -> None:
    if config is not None and not isinstance(config, KernelConfig):
        raise CallError(f"config: expected a mixforge KernelConfig or None, got {type(config).__name__}")


def _check_runnable(device: torch.device) -> None:
    if device.type != "cuda" and not interpreting():
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
