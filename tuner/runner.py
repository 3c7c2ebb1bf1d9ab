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

Compilation ahead of timing (parallel worker processes) is precompile.py; its
workers build this same objective at a reduced shape.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Optional

import torch

from mixforge.codegen.config import KernelConfig, ShapeKey

from .keys import dtype_name, interpret_mode, torch_dtype
from .study import TOLERANCE, Objective, ill_conditioned, rounding_noise

Timer = Callable[[Callable[[], object]], float]

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


class Pinned:
    """A ConfigLookup that answers `config` for one kernel and defers to `base` for the others.

    Ops ask their lookup for every call ("chunk_fwd" for the forward, "chunk_bwd"
    for the backward, ...), so one compiled ops object serves every trial: the
    study sets `config` before each run.
    """

    def __init__(self, kernel: str, base=None):
        self.kernel, self.base, self.config = kernel, base, None

    def __call__(self, mixer, sk: ShapeKey):
        if sk.kernel == self.kernel and self.config is not None:
            return self.config
        return self.base(mixer, sk) if self.base is not None else None


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _flat(x):
    if isinstance(x, (tuple, list)):
        for y in x:
            yield from _flat(y)
    elif x is not None:
        yield x


def _seeds(out, seed: int):
    """The backward pass's seeds: a fixed random gradient for y and for the final state."""
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    leaves = [t for t in _flat(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    return leaves, [torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.device, t.dtype) for t in leaves]


def _grads(out, params: list, seed: int, retain: bool = False):
    leaves, seeds = _seeds(out, seed)
    return tuple(torch.autograd.grad(leaves, params, seeds, retain_graph=retain, allow_unused=True))


#: How much coarser a kernel's arithmetic is than float32's (unit roundoffs of its dot operands: IEEE fp32,
#: tf32 for fp16 inputs, bf16): scales the float32 formula's error against float64 to the kernel's dtype.
ROUNDING_OVER_FP32 = {"fp32": 1, "fp16": 2 ** 13, "bf16": 2 ** 15}

#: the float64 reference is the trusted output while it is affordable: its forward loops over tokens
#: (fine on a GPU up to ~2^33 elements B*T*H*K*V), its backward keeps every step's state (2^28)
REFERENCE_FWD_LIMIT = 2 ** 33
REFERENCE_BWD_LIMIT = 2 ** 28
#: the length of the secondary problem (B = 1, H <= 2) that judges, against the reference, the outputs the
#: other path cannot judge
SECONDARY_T = 512


def make_objective(mixer, kernel: str, shape, dtype="bf16", *, device=None, timer: Optional[Timer] = None,
                   seed: int = 0, trusted: str = "auto", base_lookup=None) -> Objective:
    """The Objective of `kernel` of `mixer` at `shape` (B,T,H,K,V) and `dtype`.

    The runner times the op call a user makes (`ops.chunk` for chunk_fwd, its
    backward alone for chunk_bwd, `ops.recurrent`, `ops.step`); the config under
    test reaches the kernel through the ops' lookup, every other kernel gets
    `base_lookup`'s answer (by default the tuned cache and shipped defaults).
    trusted: "reference" (float64, spec.reference), "ops" (the other path:
    recurrent for chunk kernels, chunk for recurrent ones), or "auto"
    (the reference while it is affordable).
    """
    from mixforge.spec.reference import recurrence
    from mixforge.spec.testing import random_inputs

    from .lookup import default_lookup
    from .space import KERNELS

    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}")
    shape = Shape.parse(shape)
    dt = dtype_name(dtype)
    device = device or default_device()
    timer = timer or default_timer(device)
    base = base_lookup if base_lookup is not None else default_lookup()
    B, T, H, K, V = shape.astuple()
    bwd = kernel.endswith("_bwd")
    step = kernel == "step"
    if step:
        T = 1
    x = random_inputs(mixer, B, T, H, K, V, dtype=torch_dtype(dt), device=device, seed=seed, requires_grad=bwd,
                      natural=True)   # a system's own Param values where random ones are ill-conditioned
    names = list(x)
    input_names = {o.name for o in mixer.inputs}
    n = B * T * H * K * V
    use_ref = trusted == "reference" or (trusted == "auto" and n <= (REFERENCE_BWD_LIMIT if bwd else
                                                                       REFERENCE_FWD_LIMIT))
    path = "recurrent" if kernel.startswith("recurrent") or step else "chunk"
    other = "chunk" if path == "recurrent" else "recurrent"
    pinned = Pinned(kernel, base)
    state = {}

    def ops():
        if "ops" not in state:
            state["ops"] = compile_ops(mixer, config_lookup=pinned)
        return state["ops"]

    state0 = None
    if step:
        g = torch.Generator(device="cpu").manual_seed(seed + 2)
        S = (torch.randn(B, H, K, V, generator=g, dtype=torch.float32) * 0.1).to(device)
        state0 = (S, torch.rand(B, H, K, generator=g, dtype=torch.float32).to(device)) if mixer.normalize else S

    def forward(inputs, which=path):
        o = ops()
        if step:
            rows = {k: (v[:, 0] if k in input_names else v) for k, v in inputs.items()}
            kw = {"position": 0} if getattr(o.plan, "uses_t", False) else {}
            return o.step(state=state0, **kw, **rows)
        return getattr(o, which)(**inputs, output_final_state=True)

    if not bwd:
        def run(cfg: KernelConfig, inputs):
            pinned.config = cfg
            try:
                out = forward(inputs)
                _sync(device)
                return out, timer(lambda: forward(inputs))
            finally:
                pinned.config = None
    else:
        def run(cfg: KernelConfig, inputs):
            params = [inputs[k] for k in names]
            pinned.config = cfg  # ops resolve the backward's config when the forward runs
            try:
                out = forward(inputs)  # the forward itself runs with its own (looked-up) config
                grads = _grads(out, params, seed, retain=True)
                _sync(device)
                leaves, seeds = _seeds(out, seed)
                ms = timer(lambda: torch.autograd.grad(leaves, params, seeds, retain_graph=True, allow_unused=True))
                return grads, ms
            finally:
                pinned.config = None

    def reference_outputs(inputs, compute_dtype=torch.float64):
        x64 = {k: v.detach().to(torch.float64).requires_grad_(bwd) for k, v in inputs.items()}
        kw = dict(output_final_state=True, compute_dtype=compute_dtype)
        if step:
            s64 = tuple(t.double() for t in _flat(state0))
            r = recurrence(mixer, initial_state=s64 if mixer.normalize else s64[0], **kw, **x64)
            return (r.y[:, 0], r.final_state)
        r = recurrence(mixer, **kw, **x64)
        if not bwd:
            return (r.y, r.final_state)
        return _grads((r.y, r.final_state), [x64[k] for k in names], seed)

    def other_path_outputs(inputs):
        with torch.no_grad() if not bwd else torch.enable_grad():
            out = forward(inputs, other)
        if not bwd:
            return out
        return _grads(out, [inputs[k] for k in names], seed)

    def trusted_outputs(inputs):
        if use_ref:
            return reference_outputs(inputs)
        if step:
            raise ValueError("the step kernel is checked against the reference only")
        return other_path_outputs(inputs)

    # Which outputs are ill-conditioned at these inputs, and their trusted values' own rounding noise at the
    # kernel's precision (asked only when a check fails). Against the reference: its formula in float32,
    # scaled. Against the other path, nothing estimates the noise (that path computes in fp32 whatever its
    # inputs, the candidate's dots round to the dtype: performer's zero dqn came out 500x further apart than
    # the other path moves with fp32 inputs); which outputs are ill-conditioned is found on a smaller
    # problem that the reference can afford (the secondary objective, which such a candidate must pass),
    # and at this shape those outputs are not judged.
    if use_ref:
        def conditioning(inputs, trusted):
            return rounding_noise(trusted, reference_outputs(inputs, torch.float32), ROUNDING_OVER_FP32[dt])
        secondary = None
    else:
        small = Shape(1, min(T, SECONDARY_T), min(H, 2), K, V)
        secondary = make_objective(mixer, kernel, small, dt, device=device, timer=lambda fn: 1.0, seed=seed,
                                   trusted="reference", base_lookup=base_lookup)

        def conditioning(inputs, trusted):
            return {p: math.inf for p in ill_conditioned(secondary.noise(), secondary.tolerance)}

    tol = TOLERANCE[dt] * (5 if bwd else 1)
    return Objective(inputs=x, run=run, trusted=trusted_outputs, tolerance=tol, conditioning=conditioning,
                     secondary=secondary,
                     describe=f"{mixer.name} {kernel} {shape} {dt} on {device}, "
                              f"checked against {'the float64 reference' if use_ref else 'ops.' + other}")
