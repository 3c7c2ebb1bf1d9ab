"""The real objective: a compiled op run with a candidate config, timed, and its trusted outputs.

`make_objective(mixer, kernel, shape, dtype)` builds random inputs of the
bucket's shape (`spec.testing.random_inputs`, fixed seed) and

* chunk_fwd:  runs `ops.chunk(**inputs, output_final_state=True, config=cfg)`;
  outputs (y, S_T), timed as the whole forward call;
* chunk_bwd:  runs the forward once with the lookup's forward config, then times
  the backward alone (`torch.autograd.grad` with retain_graph) with `cfg`;
  outputs the gradients of every input and parameter;
* recurrent_fwd / recurrent_bwd: the same through `ops.recurrent`;
* step: one decoding step from a random state through `ops.step`.

Trusted outputs are the float64 reference (`spec.reference`) on the same
inputs when the problem is small enough for it (always on the CPU), else the
recurrent path (`ops.recurrent`) with its default config.

Timing: `triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")`
on CUDA; elsewhere (the interpreter) a plain wall-clock median whose numbers
mean nothing but keep the mechanics real. Tests inject their own `timer`.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional

import torch

from mixforge.codegen.config import KernelConfig, ShapeKey

from .keys import dtype_name, interpret_mode, torch_dtype
from .study import TOLERANCE, Objective

Timer = Callable[[Callable[[], object]], float]

#: the float64 reference is trusted while B*T*H*K*V stays below this (its loop is per token)
REFERENCE_LIMIT = 2 ** 28


@dataclasses.dataclass(frozen=True)
class Shape:
    B: int
    T: int
    H: int
    K: int
    V: int

    @classmethod
    def parse(cls, text) -> "Shape":
        if isinstance(text, Shape):
            return text
        if isinstance(text, dict):
            return cls(**{k: int(text[k]) for k in ("B", "T", "H", "K", "V")})
        if isinstance(text, str):
            parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
        else:
            parts = list(text)
        try:
            vals = [int(p) for p in parts]
        except (TypeError, ValueError):
            raise ValueError(f"shape {text!r}: expected five integers B,T,H,K,V") from None
        if len(vals) != 5 or min(vals) < 1:
            raise ValueError(f"shape {text!r}: expected five positive integers B,T,H,K,V")
        return cls(*vals)

    def astuple(self) -> tuple:
        return (self.B, self.T, self.H, self.K, self.V)

    def __str__(self) -> str:
        return ",".join(map(str, self.astuple()))


def cuda_timer(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def wall_timer(fn, reps: int = 3) -> float:
    """Median wall time in ms (CPU/interpreter: the mechanics only)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def default_timer(device) -> Timer:
    return cuda_timer if torch.device(device).type == "cuda" and not interpret_mode() else wall_timer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() and not interpret_mode() else "cpu"


# --------------------------------------------------------------------------- ops

def compile_ops(mixer, config_lookup=None):
    """mixforge's compiled ops for `mixer` (codegen; the tuner may import it, not the other way round)."""
    import mixforge.codegen as cg

    fn = getattr(cg, "compile", None)
    if fn is None:
        from mixforge.codegen import ops as _ops

        fn = _ops.compile
    return fn(mixer, config_lookup=config_lookup)


class _Pinned:
    """A ConfigLookup that answers `config` for one kernel and defers to `base` for the others."""

    def __init__(self, kernel: str, config: Optional[KernelConfig], base=None):
        self.kernel, self.config, self.base = kernel, config, base

    def __call__(self, mixer, sk: ShapeKey):
        if sk.kernel == self.kernel and self.config is not None:
            return self.config
        return self.base(mixer, sk) if self.base is not None else None


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _grads(out, inputs: dict, seed: int):
    """The backward pass's seeds: a fixed random dy for y and dS for the final state."""
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    leaves = [t for t in _flat(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    return leaves, [torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.device, t.dtype) for t in leaves]


def _flat(x):
    if isinstance(x, (tuple, list)):
        for y in x:
            yield from _flat(y)
    elif x is not None:
        yield x


def make_objective(mixer, kernel: str, shape, dtype="bf16", *, device=None, timer: Optional[Timer] = None,
                   seed: int = 0, trusted: str = "auto", base_lookup=None) -> Objective:
    """The Objective of `kernel` of `mixer` at `shape` (B,T,H,K,V) and `dtype`."""
    from mixforge.spec import reference
    from mixforge.spec.testing import random_inputs

    shape = Shape.parse(shape)
    dt = dtype_name(dtype)
    device = device or default_device()
    timer = timer or default_timer(device)
    B, T, H, K, V = shape.astuple()
    bwd = kernel.endswith("_bwd")
    if kernel == "step":
        T = 1
    inputs = random_inputs(mixer, B, T, H, K, V, dtype=torch_dtype(dt), device=device, seed=seed,
                           requires_grad=bwd)
    names = list(inputs)
    path = "recurrent" if kernel.startswith("recurrent") or kernel == "step" else "chunk"
    small = B * T * H * K * V <= REFERENCE_LIMIT or torch.device(device).type == "cpu"
    use_ref = trusted == "reference" or (trusted == "auto" and small)

    state0 = None
    if kernel == "step":
        g = torch.Generator(device="cpu").manual_seed(seed + 2)
        state0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float32).to(device) * 0.1
        if mixer.normalize:
            state0 = (state0, torch.rand(B, H, K, generator=g, dtype=torch.float32).to(device))

    def call(ops, x, cfg):
        if kernel == "step":
            step_in = {n: (t[:, 0] if t.dim() >= 3 and t.shape[:2] == (B, 1) else t) for n, t in x.items()}
            return ops.step(state=state0, config=cfg, **step_in)
        f = ops.chunk if path == "chunk" else ops.recurrent
        return f(**x, output_final_state=True, config=cfg)

    if not bwd:
        def run(cfg: KernelConfig, x):
            ops = compile_ops(mixer, config_lookup=base_lookup)
            out = call(ops, x, cfg)
            _sync(device)
            return out, timer(lambda: call(ops, x, cfg))
    else:
        fwd_kernel = kernel.replace("_bwd", "_fwd")

        def run(cfg: KernelConfig, x):
            ops = compile_ops(mixer, config_lookup=_Pinned(kernel, cfg, base_lookup))
            out = call(ops, x, None)
            leaves, seeds = _grads(out, x, seed)
            params = [x[n] for n in names]
            grads = torch.autograd.grad(leaves, params, seeds, retain_graph=True, allow_unused=True)
            _sync(device)
            ms = timer(lambda: torch.autograd.grad(leaves, params, seeds, retain_graph=True, allow_unused=True))
            return tuple(grads), ms

        del fwd_kernel

    def trusted_outputs(x):
        if use_ref:
            x64 = {n: t.detach().to(torch.float64).requires_grad_(bwd) for n, t in x.items()}
            if kernel == "step":
                s64 = None if state0 is None else tuple(s.double() for s in _flat(state0))
                s64 = s64[0] if s64 and len(s64) == 1 else s64
                y, S = reference(mixer, initial_state=s64, output_final_state=True, **x64)
                return (y[:, 0].to(torch_dtype(dt)), S)
            y, S = reference(mixer, output_final_state=True, **x64)
            if not bwd:
                return (y, S)
            leaves, seeds = _grads((y, S), x64, seed)
            return tuple(torch.autograd.grad(leaves, [x64[n] for n in names], seeds, allow_unused=True))
        ops = compile_ops(mixer, config_lookup=base_lookup)
        with torch.no_grad() if not bwd else torch.enable_grad():
            out = (ops.recurrent if kernel != "step" else ops.step)(**x, output_final_state=True)
        if not bwd:
            return out
        leaves, seeds = _grads(out, x, seed)
        return tuple(torch.autograd.grad(leaves, [x[n] for n in names], seeds, allow_unused=True))

    tol = TOLERANCE[dt] * (5 if bwd else 1)
    return Objective(inputs=inputs, run=run, trusted=trusted_outputs, tolerance=tol,
                     describe=f"{mixer.name} {kernel} {shape} {dt} on {device}")
