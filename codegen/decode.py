"""Decoding one token at a time with little host work: `MixerOps.decoder`.

    dec = ops.decoder(state=S, position=P, **token)   # validated once, like ops.step
    for _ in range(n):
        y = dec(**token)                # copy the token in, one step, y [B, H, V]
    dec.state                           # advanced in place by every call
    dec.load_state(S2, position=P2)     # or dec.reset(): zeros, position 0

A plain `ops.step` validates (once per layout), allocates a new state and
launches one or two kernels per call: tens of microseconds of Python and
launch overhead per token. A Decoder owns static buffers for one token's
inputs, the parameters, the state (updated in place by the step kernel) and
the positions; on a CUDA device its first call records the step (kernels,
position advance) in a torch.cuda.CUDAGraph, after a warm-up launch on a side
stream that works on scratch copies of the state, and every call replays it.
A call then costs one copy of the inputs into the buffers and one graph
launch. The input buffers are views of one flat buffer. Small tokens are
copied by `torch._foreach_copy_`, whose launch costs the host least; it gives
each GPU block up to 65536 elements of one input, so from that size on (B = 32
at H = 16, K = 128) one `torch.cat` into the flat buffer copies faster: it
spreads over the whole GPU, though its launch carries kilobytes of arguments
(an H100, gla's five bf16 inputs: at B = 64 the step took 75.0 us with the
foreach copy, 62.5 with the cat; at B = 1 10.4 and 17.8;
`decode_sizes-20261123-0941-h100.json`).
Without CUDA (CPU tensors under TRITON_INTERPRET=1), or with graph=False, the
same object launches the kernels on its buffers directly.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..spec.errors import CallError
from ..spec.shapes import check_state, layout
from . import epilogue, recurrent
from .config import KernelConfig


#: the elements of one input from which its copy goes by torch.cat: torch._foreach_copy_'s kernel gives each
#: block a chunk of up to this many elements of one tensor (PyTorch's multi_tensor_apply kChunkSize)
FOREACH_CHUNK = 65536


class Decoder:
    """One decoding step of a compiled mixer, on static buffers (see the module docstring).

    Built by `ops.decoder(state=None, position=None, scale=None, config=None, graph=None, **tensors)`:

    - `tensors`: one token's inputs and the parameters, exactly as `ops.step` takes them
      (inputs without the T axis). They fix the batch size, heads, sizes, dtype and device,
      validated with ops.step's checks and messages. The inputs' values are not used (zeros
      or the first token will do); the parameters' values are copied and kept.
    - `state`: the state to start from (fp32 [B, H, K, V]; normalize: the pair (S, z)),
      copied; None for zeros.
    - `position`: the next token's position (int, or an integer tensor [B] for sequences
      of different lengths, e.g. their prefill lengths). Mixers whose maps use t need it
      when a state is given; it defaults to 0 otherwise. It advances by one per step.
    - `scale`, `config`: as for ops.step; the config is chosen here, once.
    - `graph`: capture a CUDA graph (default: on CUDA devices); False launches the
      kernels on every call (also on CUDA).

    Calls:

    - `y = dec(position=None, **tensors)`: copies one token's inputs (all of them; each
      must have the shape, dtype and device of the decoder's buffer) and any parameters
      given into the buffers, runs one step and returns y [B, H, V] in the inputs' dtype.
      With a graph, y is the same tensor on every call, overwritten by the next one: clone
      it to keep it. `position` overrides the position of this token (int or [B]).
    - `y = dec.run()`: one step on what `dec.inputs` hold now (no copy: write the token
      into those buffers yourself, e.g. with `out=`).
    - `dec.state`: the state buffer (the pair (S, z) for normalize mixers), advanced in
      place; `dec.position`: the next token's positions, int32 [B] (None for mixers whose
      maps do not use t).
    - `dec.load_state(state, position=None)`, `dec.reset()`: copy a state in (validated
      like ops.step's `state`), or zeros and position 0.
    """

    def __init__(self, ops, tensors: dict, *, state=None, position=None, scale=None,
                 config: Optional[KernelConfig] = None, graph: Optional[bool] = None):
        from .ops import _split_state, _step_positions

        lay = ops._step_layout(tensors, state, scale, config)   # ops.step's validation and messages
        self._ops, self._plan = ops, ops.plan
        sh = self.shapes = lay.shapes
        self.device = sh.device
        B, H, K, V = sh.B, sh.H, sh.K, sh.V
        self.config = config or ops._step_config(lay)
        if graph is None:
            graph = sh.device.type == "cuda"
        if graph and sh.device.type != "cuda":
            raise CallError(f"graph: CUDA graphs need a CUDA device, the tensors are on {sh.device}")
        self._use_graph = bool(graph)
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._y: Optional[torch.Tensor] = None

        decl = ops.mixer
        self._input_names = tuple(o.name for o in decl.inputs)
        self._input_set = frozenset(self._input_names)
        self._layouts = {o.name: [a for a in layout(o) if a != "T"] for o in decl.operands}
        # normal tensors even when built under torch.inference_mode, so that calls outside it can update them
        with torch.inference_mode(False), torch.no_grad():
            # one flat buffer (the inputs share one dtype, ops.step's validation) and the inputs as its views
            sizes = [tensors[n].numel() for n in self._input_names]
            self._flat = torch.zeros(sum(sizes), dtype=sh.dtype, device=sh.device)
            self.inputs = {n: part.view(tensors[n].shape)
                           for n, part in zip(self._input_names, self._flat.split(sizes))}
            self._input_buffers = list(self.inputs.values())
            self._copy_by_cat = max(sizes) >= FOREACH_CHUNK
            self.params = {o.name: tensors[o.name].detach().clone(memory_format=torch.contiguous_format)
                           for o in decl.params}
            f32 = dict(dtype=torch.float32, device=sh.device)
            S0, z0 = _split_state(self._plan.normalize, state)
            self._S = S0.clone() if S0 is not None else torch.zeros(B, H, K, V, **f32)
            self._z = None
            if self._plan.normalize:
                self._z = z0.clone() if z0 is not None else torch.zeros(B, H, K, **f32)
                self._z_next = torch.empty_like(self._z)   # z cannot be updated in place (recurrent.step)
            self._positions = None
            if self._plan.uses_t:
                if position is None and state is None:
                    position = 0
                self._positions = _step_positions(position, B, sh.device).clone()
        self._buffers = {**self.inputs, **self.params}
        xs = [self._buffers[n].unsqueeze(1) if n in self.inputs else self._buffers[n]
              for n in self._plan.operand_names]
        self._ctx = lay.context(xs, self._S, self._z, self._positions)

    # ------------------------------------------------------------------ state
    @property
    def state(self):
        """The state buffer, advanced in place by every step: S [B, H, K, V] (normalize: (S, z))."""
        return (self._S, self._z) if self._plan.normalize else self._S

    @property
    def position(self) -> Optional[torch.Tensor]:
        """The next token's positions, int32 [B] (a buffer); None when the mixer's maps do not use t."""
        return self._positions

    def load_state(self, state, position=None) -> None:
        """Copy `state` into the decoder's state (checked like ops.step's `state`) and set the next position
        (required by mixers whose maps use t)."""
        from .ops import _split_state

        sh = self.shapes
        check_state("state", state, self._ops._declared, sh.B, sh.H, sh.K, sh.V, sh.device, (torch.float32,))
        positions = self._check_position(position) if self._plan.uses_t else None
        S, z = _split_state(self._plan.normalize, state)
        with torch.no_grad():
            self._S.copy_(S)
            if z is not None:
                self._z.copy_(z)
            if positions is not None:
                self._positions.copy_(positions)

    def reset(self) -> None:
        """Zeros for the state, 0 for the position: the start of new sequences."""
        with torch.no_grad():
            self._S.zero_()
            if self._z is not None:
                self._z.zero_()
            if self._positions is not None:
                self._positions.zero_()

    # ------------------------------------------------------------------ steps
    def __call__(self, position=None, **tensors) -> torch.Tensor:
        """Copy one token's inputs (and any parameters given) into the buffers, step, return y [B, H, V]."""
        # the per-token path: one pass of cheap comparisons; the messages are built only on a mismatch
        buffers, inputs = self._buffers, self.inputs
        params_dst, params_src, grad = [], [], False
        for n, x in tensors.items():
            buf = buffers.get(n)
            if (buf is None or not isinstance(x, torch.Tensor) or x.shape != buf.shape or x.dtype != buf.dtype
                    or x.device != buf.device):
                self._explain(n, x)
            if n not in inputs:
                params_dst.append(buf)
                params_src.append(x)
            grad = grad or x.requires_grad
        if not self._input_set <= tensors.keys():
            missing = [n for n in self._input_names if n not in tensors]
            raise CallError(f"missing input {missing[0]!r}: a decoder step takes every input of one token "
                            f"({', '.join(self._input_names)}); parameters are optional")
        positions = self._check_position(position) if position is not None and self._positions is not None else None
        if grad:    # a token straight from a graph that tracks gradients: the copy must not be recorded
            with torch.no_grad():
                self._copy_in(tensors, params_dst, params_src)
        else:
            self._copy_in(tensors, params_dst, params_src)
        if positions is not None:
            self._positions.copy_(positions)
        return self.run()

    def _copy_in(self, tensors: dict, params_dst: list, params_src: list) -> None:
        """The token's inputs into the flat buffer (the module docstring says which copy), parameters given."""
        names = self._input_names
        if self._copy_by_cat:
            torch.cat([tensors[n].reshape(-1) for n in names], out=self._flat)
            if params_dst:
                torch._foreach_copy_(params_dst, params_src)
        else:
            torch._foreach_copy_(self._input_buffers + params_dst, [tensors[n] for n in names] + params_src)

    def _explain(self, n: str, x) -> None:
        """Raise the error for a token tensor `n` that does not fit its buffer."""
        buf = self._buffers.get(n)
        if buf is None:
            raise CallError(f"unexpected input {n!r}: mixer {self._ops.mixer.name!r} takes "
                            f"{', '.join(self._buffers)} (and position)")
        if not isinstance(x, torch.Tensor):
            raise CallError(f"{n}: expected a torch.Tensor, got {type(x).__name__}")
        if x.shape != buf.shape:
            raise CallError(f"{n}: expected shape [{', '.join(self._layouts[n])}] = {list(buf.shape)} "
                            f"(this decoder's), got {list(x.shape)}")
        if x.dtype != buf.dtype:
            raise CallError(f"{n}: expected dtype {buf.dtype} (this decoder's), got {x.dtype}")
        raise CallError(f"{n}: expected device {buf.device} (this decoder's), got {x.device}")

    def run(self) -> torch.Tensor:
        """One step on what `inputs` and `params` hold now: y [B, H, V]; the state and position advance."""
        if self._graph is not None:
            self._graph.replay()
            return self._y
        if self._use_graph:
            self._capture()
            self._graph.replay()
            return self._y
        with torch.no_grad():
            return self._launch(self._ctx, self._S, self._z_next if self._z is not None else None)

    def _launch(self, ctx, S, z_next) -> torch.Tensor:
        """The step's work on ctx's buffers: the kernel (the state S in place), z, the epilogue, position += 1."""
        sh = self.shapes
        o, _, z_new = recurrent.step(ctx, self.config, ctx.positions, S_new=S, z_new=z_next)
        if z_new is not None:
            ctx.z0.copy_(z_new)
        if self._plan.has_epilogue:
            y = epilogue.forward(ctx, o.view(sh.B, 1, sh.H, sh.V)).view(sh.B, sh.H, sh.V)
        else:
            y = o
        if ctx.positions is not None:
            ctx.positions.add_(1)
        return y

    def _capture(self) -> None:
        """Warm up on scratch copies of the state (compiles and loads the kernels), then record one step."""
        import dataclasses

        ctx = self._ctx
        with torch.no_grad():
            scratch = dataclasses.replace(
                ctx, S0=ctx.S0.clone(), z0=ctx.z0.clone() if ctx.z0 is not None else None,
                positions=ctx.positions.clone() if ctx.positions is not None else None)
            z_next = torch.empty_like(ctx.z0) if ctx.z0 is not None else None
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._launch(scratch, scratch.S0, z_next)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = self._launch(ctx, self._S, self._z_next if self._z is not None else None)
        self._graph, self._y = graph, y

    def _check_position(self, position) -> torch.Tensor:
        from .ops import _step_positions

        return _step_positions(position, self.shapes.B, self.device)

    def __repr__(self) -> str:
        sh = self.shapes
        mode = "graph" if self._use_graph else "eager"
        return (f"Decoder({self._ops.mixer.name!r}, B={sh.B}, H={sh.H}, K={sh.K}, V={sh.V}, "
                f"dtype={sh.dtype}, device={sh.device}, {mode})")


__all__ = ["Decoder"]
