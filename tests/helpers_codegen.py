"""Shared checks for the codegen, ops and recurrent tests: kernels against the float64 reference.

`rel_err` is the suite's metric: ||out - ref|| / ||ref||, with NaN or Inf
anywhere in the output failing outright. `check_call` runs an ops call and the
reference on the same inputs (float64 copies for the reference), backpropagates
one random cotangent through y and the final state in both, and compares
outputs, final states and every gradient (inputs, parameters, initial state).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch

import mixforge as mf

TOL = 1e-4


@functools.cache
def zoo_ops(name: str):
    """The compiled ops of a zoo mixer, once per test session."""
    return mf.compile(mf.zoo.ALL[name])


def step_token(mixer, x: dict, t: int) -> dict:
    """The step call of token t: per-token inputs without the T axis, parameters as they are."""
    inputs = {o.name for o in mixer.inputs}
    return {k: (v[:, t] if k in inputs else v) for k, v in x.items()}


def prefill_state(ops, mixer, x: dict, n: int):
    """The recurrent path's final state after the first n tokens of x (a decoding loop's starting point)."""
    inputs = {o.name for o in mixer.inputs}
    _, state = ops.recurrent(**{k: (v[:, :n] if k in inputs else v) for k, v in x.items()}, output_final_state=True)
    return state


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """||out - ref|| / max(||ref||, floor); inf when out has NaN or Inf."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {list(out.shape)} != reference {list(ref.shape)}")
    if not torch.isfinite(out).all():
        return math.inf
    denom = max(ref.norm().item(), floor)
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(out, ref, what: str, tol: float = TOL, floor: float = 0.0) -> None:
    err = rel_err(out, ref, floor)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


def state_parts(state):
    """A state as a tuple of tensors (S) or (S, z)."""
    if state is None:
        return ()
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def random_state(mixer, N, H, K, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(N, H, K, V, generator=g)
    if mixer.normalize:   # z of a positive-feature mixer is positive: keep denominators away from 0
        return S, torch.rand(N, H, K, generator=g) + 0.5
    return S


def check_call(mixer, call: Callable, x: dict, *, initial_state=None, cu_seqlens=None, scale=None,
               tol: float = TOL, grads: bool = True, seed: int = 0, output_final_state: bool = True,
               floor: float = 1e-3):
    """Compare call(**x, initial_state=..., ...) with mf.reference, values and gradients.

    A gradient smaller than `floor` times the largest reference gradient is structurally ~0
    (e.g. a scale-invariant input of a normalized mixer): it is compared at that scale.
    """
    leaves = {k: v.detach().clone().requires_grad_(grads) for k, v in x.items()}
    init = tuple(t.detach().clone().requires_grad_(grads) for t in state_parts(initial_state))
    init_arg = None if not init else (init if mixer.normalize else init[0])
    y, final = call(**leaves, initial_state=init_arg, output_final_state=output_final_state,
                    cu_seqlens=cu_seqlens, scale=scale)

    x64 = {k: v.detach().double().requires_grad_(grads) for k, v in x.items()}
    init64 = tuple(t.detach().double().requires_grad_(grads) for t in init)
    init64_arg = None if not init64 else (init64 if mixer.normalize else init64[0])
    y_ref, final_ref = mf.reference(mixer, **x64, initial_state=init64_arg, output_final_state=output_final_state,
                                    cu_seqlens=cu_seqlens, scale=scale)

    assert y.dtype == next(v.dtype for k, v in x.items() if k in {o.name for o in mixer.inputs})
    assert_close(y, y_ref, "y", tol)
    for i, (s, s_ref) in enumerate(zip(state_parts(final), state_parts(final_ref))):
        assert s.dtype == torch.float32
        assert_close(s, s_ref, f"final state[{i}]", tol)
    if not grads:
        return y, final

    g = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(y.shape, generator=g)
    g_states = [torch.randn(s.shape, generator=g) for s in state_parts(final)]
    loss = (y.float() * gy).sum() + sum((s * c).sum() for s, c in zip(state_parts(final), g_states))
    loss_ref = (y_ref * gy.double()).sum() + sum((s * c.double()).sum() for s, c in zip(state_parts(final_ref), g_states))
    loss.backward()
    loss_ref.backward()
    ref_grads = {k: v.grad for k, v in x64.items()}
    ref_grads.update({f"initial_state[{i}]": t.grad for i, t in enumerate(init64)})
    got = {k: v.grad for k, v in leaves.items()}
    got.update({f"initial_state[{i}]": t.grad for i, t in enumerate(init)})
    scale_floor = floor * max(r.norm().item() for r in ref_grads.values() if r is not None)
    for name, ref in ref_grads.items():
        assert got[name] is not None, f"no gradient for {name}"
        assert got[name].dtype == (x[name].dtype if name in x else torch.float32), name
        assert_close(got[name], torch.zeros_like(got[name]) if ref is None else ref, f"d{name}", tol, scale_floor)
    return y, final
