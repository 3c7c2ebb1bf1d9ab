"""Shared helpers for the spec tests: shapes per zoo mixer, relative errors, and the parallel form.

The parallel form here is assembled from `mixforge.attention_map` (M), the
value map, the bonus term and the initial state, exactly as ALGORITHMS.md §2
states it; the recurrence it is compared with is `mixforge.spec.reference.recurrence`.
"""
from __future__ import annotations

import torch

from mixforge import Mixer, attention_map
from mixforge.spec.mixer import CLASS_VALUE, shape_class
from mixforge.spec.reference import NORMALIZE_EPS, bonus_term, evaluate_maps
from mixforge.spec.shapes import REFERENCE_DTYPES, resolve_call
from mixforge.spec.symbols import Input
from mixforge.spec.testing import random_inputs

F64 = torch.float64
RTOL = 1e-10


def zoo_dims(name: str, H: int = 2, K: int = 4, V: int = 3) -> dict:
    """Shapes for a zoo mixer: mamba has one value per channel; mamba/mamba2 run grouped (G=2, H=4)."""
    if name == "mamba":
        return dict(H=4, K=K, V=1, G=2)
    if name == "mamba2":
        return dict(H=4, K=K, V=V, G=2)
    return dict(H=H, K=K, V=V, G=1)


def zoo_inputs(m: Mixer, *, B=2, T=9, seed=0, decay="normal", **dims) -> dict:
    d = {**zoo_dims(m.name), **dims}
    return random_inputs(m, B=B, T=T, H=d["H"], K=d["K"], V=d["V"], G=d["G"], dtype=F64, seed=seed, decay=decay)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "NaN or inf in the output"
    assert torch.isfinite(ref).all(), "NaN or inf in the reference"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float = RTOL, what: str = "",
                 allow_zero: bool = False) -> None:
    """Relative error ||out - ref|| / ||ref|| <= tol, on a reference that is not all zeros (unless allowed:
    then an all-zero reference needs an exactly zero output)."""
    assert torch.isfinite(out).all() and torch.isfinite(ref).all(), f"{what}: NaN or inf"
    if allow_zero and ref.norm() == 0:
        assert torch.isfinite(out).all() and out.norm() == 0, f"{what}: expected all zeros"
        return
    assert ref.norm() > 0, f"{what}: the reference is all zeros, the comparison would prove nothing"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def call_maps(m: Mixer, x: dict, cu_seqlens=None):
    shapes = resolve_call(m, x, cu_seqlens=cu_seqlens, dtypes=REFERENCE_DTYPES)
    return evaluate_maps(m, x, shapes, cu_seqlens=cu_seqlens)


def sequences(T: int, B: int, cu_seqlens) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of each sequence."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    c = cu_seqlens.tolist()
    return [(0, s, e) for s, e in zip(c, c[1:])]


def raw_twin(m: Mixer) -> Mixer:
    """The same fq, fk, fv, fa without denominator, bonus, gate or norm, scale 1: its M is the raw weight."""
    return Mixer(m.name + "_raw", fq=m.maps["fq"], fk=m.maps["fk"], fv=m.maps["fv"], fa=m.maps.get("fa"),
                 inclusive=m.inclusive, scale=1.0)


def uses_bonus_term(m: Mixer) -> bool:
    """True when the bonus is not a weight on the diagonal of M (nonlinear, or a per-value coefficient)."""
    if m.bonus is None:
        return False
    c = m.bonus.linear_coefficient
    return c is None or shape_class(c) == CLASS_VALUE


def parallel_form(m: Mixer, x: dict, *, cu_seqlens=None, initial_state=None):
    """(o, S_T) from the parallel form: o = M v (+ nonlinear bonus) (+ scale * (q * e^L)^T S_0).

    With normalize, numerator and denominator are each the parallel sums, both including S_0 and z_0.
    The final state is sum_s (k_s e^{L_T - L_s}) v_s^T + e^{L_T} S_0 per sequence.
    """
    maps = call_maps(m, x, cu_seqlens)
    q, k, v, gamma = maps.q, maps.k, maps.v, maps.gamma          # [B, T, H, K|V]
    B, T, H, K = q.shape
    V = v.shape[-1]
    seqs = sequences(T, B, cu_seqlens)
    N = len(seqs)
    # cumulative log-decay per sequence; an exclusive read sees L_{t-1}
    L = torch.zeros_like(gamma)
    for b, s, e in seqs:
        L[b, s:e] = gamma[b, s:e].cumsum(0)
    Lread = L if m.inclusive else L - gamma

    if initial_state is None:
        S0 = torch.zeros(N, H, K, V, dtype=F64)
        z0 = torch.zeros(N, H, K, dtype=F64)
    elif m.normalize:
        S0, z0 = (t.to(F64) for t in initial_state)
    else:
        S0, z0 = initial_state.to(F64), torch.zeros(N, H, K, dtype=F64)
    S0_tok = torch.zeros(B, T, H, K, V, dtype=F64)   # each token's sequence's S_0
    z0_tok = torch.zeros(B, T, H, K, dtype=F64)
    for n, (b, s, e) in enumerate(seqs):
        S0_tok[b, s:e] = S0[n]
        z0_tok[b, s:e] = z0[n]
    qe = q * torch.exp(Lread)
    init_num = torch.einsum("bthk,bthkv->bthv", qe, S0_tok)
    init_den = (qe * z0_tok).sum(-1, keepdim=True)

    if m.normalize:
        twin = raw_twin(m)
        xt = {o.name: x[o.name] for o in twin.operands}
        M_raw = attention_map(twin, cu_seqlens=cu_seqlens, **xt)
        # the twin may lose the operand that fixed K (rwkv4's bonus weight); its key dims are then all
        # alike, and the K of the real mixer sums K equal terms
        M_raw = M_raw * (K / resolve_call(twin, xt, cu_seqlens=cu_seqlens, dtypes=REFERENCE_DTYPES).K)
        num = torch.einsum("bhts,bshv->bthv", M_raw, v) + init_num
        den = M_raw.sum(-1).permute(0, 2, 1)[..., None] + init_den + NORMALIZE_EPS
        o = num / den
        if m.bonus is not None:
            o = o + bonus_term(m, maps, x)
        if initial_state is None:   # attention_map's own normalized M must give the same
            M = attention_map(m, cu_seqlens=cu_seqlens, **x)
            o_m = torch.einsum("bhts,bshv->bthv", M, v)
            if uses_bonus_term(m):
                o_m = o_m + bonus_term(m, maps, x)
            assert_close(o_m, o, what="normalized M v vs M_raw v / (row sum + eps)", allow_zero=True)
    else:
        M = attention_map(m, cu_seqlens=cu_seqlens, **x)
        o = torch.einsum("bhts,bshv->bthv", M, v) + maps.scale * init_num
        if uses_bonus_term(m):
            o = o + bonus_term(m, maps, x)

    S_T = torch.zeros(N, H, K, V, dtype=F64)
    z_T = torch.zeros(N, H, K, dtype=F64)
    for n, (b, s, e) in enumerate(seqs):
        L_T = L[b, e - 1] if e > s else torch.zeros(H, K, dtype=F64)
        w = torch.exp(L_T[None] - L[b, s:e])                                  # [n, H, K]
        S_T[n] = torch.einsum("thk,thv->hkv", k[b, s:e] * w, v[b, s:e]) + torch.exp(L_T)[..., None] * S0[n]
        z_T[n] = (k[b, s:e] * w).sum(0) + torch.exp(L_T) * z0[n]
    return o, ((S_T, z_T) if m.normalize else S_T)


def split_sequences(m: Mixer, x: dict, cu_seqlens) -> list[dict]:
    """The B = 1 packed inputs of a varlen call, cut into one dict per sequence."""
    T = x[m.inputs[0].name].shape[1]
    return [{o.name: (x[o.name][:, s:e] if isinstance(o, Input) else x[o.name]) for o in m.operands}
            for _, s, e in sequences(T, 1, cu_seqlens)]
