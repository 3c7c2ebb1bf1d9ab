"""The ground truth: the recurrence of ALGORITHMS.md §2 in float64, and its parallel form.

Plain PyTorch, differentiable, slow and obviously right. Every kernel is
tested against `reference`; `attention_map` is the implicit attention matrix
(the parallel form of seeds 001/002), which is also the explainability view.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import sympy
import torch

from . import functions as fn
from .errors import CallError
from .mixer import CLASS_VALUE, Mixer, shape_class
from .shapes import REFERENCE_DTYPES, CallShapes, resolve_call, segments
from .symbols import KEY, SCALAR, VALUE, Input, h, s, t, value

NORM_EPS = 1e-5
NORMALIZE_EPS = 1e-6


# --------------------------------------------------------------------------- maps -> tensors

@functools.lru_cache(maxsize=512)
def _lambdify(expr: sympy.Expr, names: tuple[str, ...]):
    syms = sorted(expr.free_symbols, key=lambda x: x.name)
    by_name = {x.name: x for x in syms}
    args = [by_name.get(n, sympy.Symbol(f"_unused_{n}")) for n in names]
    return sympy.lambdify(args, expr, modules=[fn.TORCH])


def _operand_tensor(o, x: torch.Tensor, shapes: CallShapes, dtype) -> torch.Tensor:
    """Broadcastable [B|1, T|1, H, K|V|1] view of an operand."""
    x = x.to(dtype)
    if isinstance(o, Input):
        if o.grouped:
            x = x.repeat_interleave(shapes.H // x.shape[2], dim=2)
        return x.unsqueeze(-1) if o.dim == SCALAR else x
    return {KEY: x, VALUE: x, SCALAR: x.unsqueeze(-1)}[o.dim][None, None]


def positions(shapes: CallShapes, cu_seqlens, device) -> torch.Tensor:
    """t for every token: [B, T], restarting at each sequence of a varlen batch."""
    pos = torch.arange(shapes.T, device=device).expand(shapes.B, shapes.T).clone()
    if cu_seqlens is not None:
        for _, a, b in segments(shapes, cu_seqlens):
            pos[0, a:b] = torch.arange(b - a, device=device)
    return pos


def evaluate(expr: sympy.Expr, env: dict[str, torch.Tensor], shape, dtype, device) -> torch.Tensor:
    names = tuple(sorted(env))
    f = _lambdify(expr, names)
    out = f(*(env[n] for n in names))
    out = torch.as_tensor(out, dtype=dtype, device=device)
    return out.expand(shape)


@dataclasses.dataclass
class Maps:
    """The five maps (and the bonus weight) evaluated on a call's tensors, full shape."""

    q: torch.Tensor        # [B, T, H, K]
    k: torch.Tensor        # [B, T, H, K]
    v: torch.Tensor        # [B, T, H, V]
    gamma: torch.Tensor    # [B, T, H, K]  log-decay, 0 where no decay
    g: torch.Tensor | None  # [B, T, H, V]
    w: torch.Tensor | None  # [1, 1, H, K] bonus weight
    shapes: CallShapes
    scale: float


def evaluate_maps(mixer: Mixer, tensors: dict, shapes: CallShapes, *, cu_seqlens=None, scale=None,
                  dtype=torch.float64) -> Maps:
    dev = shapes.device
    env = {o.name: _operand_tensor(o, tensors[o.name], shapes, dtype) for o in mixer.operands}
    env["h"] = torch.arange(shapes.H, device=dev, dtype=dtype).view(1, 1, shapes.H, 1)
    env["t"] = positions(shapes, cu_seqlens, dev).to(dtype)[:, :, None, None]
    B, T, H, K, V = shapes.B, shapes.T, shapes.H, shapes.K, shapes.V
    kshape, vshape = (B, T, H, K), (B, T, H, V)
    m = mixer.maps
    q = evaluate(m["fq"], env, kshape, dtype, dev)
    k = evaluate(m["fk"], env, kshape, dtype, dev)
    v = evaluate(m["fv"], env, vshape, dtype, dev)
    gamma = evaluate(m["fa"], env, kshape, dtype, dev) if "fa" in m else torch.zeros(kshape, dtype=dtype, device=dev)
    g = evaluate(m["fg"], env, vshape, dtype, dev) if "fg" in m else None
    w = evaluate(mixer.bonus.weight, env, (1, 1, H, K), dtype, dev) if mixer.bonus is not None else None
    return Maps(q, k, v, gamma, g, w, shapes, default_scale(mixer, K, scale))


def default_scale(mixer: Mixer, K: int, scale=None) -> float:
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
            raise CallError(f"scale: expected a positive finite number, got {scale!r}")
        return float(scale)
    return mixer.scale if mixer.scale is not None else K ** -0.5


def bonus_term(mixer: Mixer, maps: Maps, tensors: dict) -> torch.Tensor | None:
    """term(s_t, fv_t), [B, T, H, V]."""
    if mixer.bonus is None:
        return None
    sc = maps.scale * (maps.q * maps.w * maps.k).sum(-1, keepdim=True)
    env = {o.name: _operand_tensor(o, tensors[o.name], maps.shapes, maps.q.dtype) for o in mixer.params}
    env["s"], env["value"] = sc, maps.v
    return evaluate(mixer.bonus.term, env, maps.v.shape, maps.q.dtype, maps.q.device)


def apply_norm(norm: str | None, o: torch.Tensor) -> torch.Tensor:
    if norm is None:
        return o
    if norm == "rms":
        return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + NORM_EPS)
    mu = o.mean(-1, keepdim=True)
    var = (o - mu).pow(2).mean(-1, keepdim=True)
    return (o - mu) * torch.rsqrt(var + NORM_EPS)


# --------------------------------------------------------------------------- recurrence

@dataclasses.dataclass
class ReferenceResult:
    y: torch.Tensor           # [B, T, H, V] after gate and norm
    o: torch.Tensor           # [B, T, H, V] before gate and norm
    final_state: object       # [N, H, K, V] (pair with z [N, H, K] if normalize), or None


def _split_state(mixer: Mixer, state, N, H, K, V, dtype, device):
    if state is None:
        S = torch.zeros(N, H, K, V, dtype=dtype, device=device)
        z = torch.zeros(N, H, K, dtype=dtype, device=device) if mixer.normalize else None
        return S, z
    if mixer.normalize:
        return state[0].to(dtype), state[1].to(dtype)
    return state.to(dtype), None


def _scan(mixer: Mixer, q, k, v, gamma, S, z, scale):
    """One sequence batch: q, k, gamma [B, T, H, K]; v [B, T, H, V]; S [B, H, K, V]."""
    outs = []
    for i in range(q.shape[1]):
        decay = torch.exp(gamma[:, i])
        S_prev, z_prev = S, z
        S = decay[..., None] * S + k[:, i, :, :, None] * v[:, i, :, None, :]
        if z is not None:
            z = decay * z + k[:, i]
        S_read, z_read = (S, z) if mixer.inclusive else (S_prev, z_prev)
        num = torch.einsum("bhk,bhkv->bhv", q[:, i], S_read)
        if mixer.normalize:
            den = (q[:, i] * z_read).sum(-1, keepdim=True) + NORMALIZE_EPS
            outs.append(num / den)
        else:
            outs.append(scale * num)
    o = torch.stack(outs, 1) if outs else v.new_zeros(v.shape)
    return o, S, z


def recurrence(mixer: Mixer, *, initial_state=None, output_final_state=False, cu_seqlens=None,
               scale=None, compute_dtype=torch.float64, round_features=None, **tensors) -> ReferenceResult:
    """The recurrence in `compute_dtype`: float64 is the reference; float32 measures how well conditioned
    a check is at its inputs (how far the same formula in float32 falls from float64).
    round_features: a dtype the q and k features are rounded to first (a 16-bit kernel's dot operands), so
    the result is the best a kernel with such operands can do at these inputs."""
    shapes = resolve_call(mixer, tensors, initial_state=initial_state, cu_seqlens=cu_seqlens,
                          dtypes=REFERENCE_DTYPES, state_dtypes=(torch.float32, torch.float64))
    dt = compute_dtype
    maps = evaluate_maps(mixer, tensors, shapes, cu_seqlens=cu_seqlens, scale=scale, dtype=dt)
    if round_features is not None:
        maps.q, maps.k = maps.q.to(round_features).to(dt), maps.k.to(round_features).to(dt)
    N, H, K, V = shapes.N, shapes.H, shapes.K, shapes.V
    S0, z0 = _split_state(mixer, initial_state, N, H, K, V, dt, shapes.device)
    if cu_seqlens is None:
        o, S, z = _scan(mixer, maps.q, maps.k, maps.v, maps.gamma, S0, z0, maps.scale)
    else:
        pieces, finals_S, finals_z = [], [], []
        for n, (_, a, b) in enumerate(segments(shapes, cu_seqlens)):
            sl = slice(a, b)
            o_n, S_n, z_n = _scan(mixer, maps.q[:, sl], maps.k[:, sl], maps.v[:, sl], maps.gamma[:, sl],
                                  S0[n:n + 1], None if z0 is None else z0[n:n + 1], maps.scale)
            pieces.append(o_n)
            finals_S.append(S_n)
            finals_z.append(z_n)
        o = torch.cat(pieces, 1)
        S = torch.cat(finals_S, 0)
        z = torch.cat(finals_z, 0) if mixer.normalize else None
    bonus = bonus_term(mixer, maps, tensors)
    if bonus is not None:
        o = o + bonus
    y = apply_norm(mixer.norm, o)
    if maps.g is not None:
        y = maps.g * y
    final = None
    if output_final_state:
        final = (S, z) if mixer.normalize else S
    return ReferenceResult(y, o, final)


def reference(mixer: Mixer, *, initial_state=None, output_final_state=False, cu_seqlens=None, scale=None,
              **tensors):
    """(y, final_state) in float64: the recurrence, exactly as ALGORITHMS.md §2."""
    r = recurrence(mixer, initial_state=initial_state, output_final_state=output_final_state,
                   cu_seqlens=cu_seqlens, scale=scale, **tensors)
    return r.y, r.final_state


# --------------------------------------------------------------------------- parallel form

def attention_map(mixer: Mixer, *, cu_seqlens=None, scale=None, **tensors) -> torch.Tensor:
    """M [B, H, T, T] in float64: the weight of fv_s in o_t, before gate and norm.

    M[t, s] = scale * sum_d fq_td fk_sd exp(L_td - L_sd) for s <= t, L the
    cumulative log-decay of the sequence; when not inclusive, s < t and the row
    reads L_{t-1} (the state before the current token). A bonus that is
    linear in the value (c(s_t) * value) adds c(s_t) on the diagonal; a nonlinear
    bonus (MetaLA's sigmoid) is not a weight on v and is left out. With
    `normalize`, each row is divided by its denominator. The initial state's
    contribution is not part of M.
    """
    shapes = resolve_call(mixer, tensors, cu_seqlens=cu_seqlens, dtypes=REFERENCE_DTYPES)
    maps = evaluate_maps(mixer, tensors, shapes, cu_seqlens=cu_seqlens, scale=scale)
    B, T, H = shapes.B, shapes.T, shapes.H
    seq = torch.zeros(B, T, dtype=torch.long, device=shapes.device)
    L = torch.empty_like(maps.gamma)
    for n, (b, a, e) in enumerate(segments(shapes, cu_seqlens)):
        seq[b, a:e] = n
        L[b, a:e] = maps.gamma[b, a:e].cumsum(0)
    M = maps.q.new_zeros(B, H, T, T)
    q, k = maps.q.permute(0, 2, 1, 3), maps.k.permute(0, 2, 1, 3)   # [B, H, T, K]
    Lk = L.permute(0, 2, 1, 3)
    # an exclusive read sees S_{t-1}: the row's own decay is not applied yet
    Lq = Lk if mixer.inclusive else (L - maps.gamma).permute(0, 2, 1, 3)
    idx = torch.arange(T, device=shapes.device)
    same = seq[:, :, None] == seq[:, None, :]                              # [B, T, T]
    for i in range(T):
        lo = i + 1 if mixer.inclusive else i
        if lo == 0:
            continue
        # exponents L_i - L_j <= 0 for j <= i in the same sequence: nothing overflows. Across a
        # sequence boundary L restarts and the difference can be huge: exp(-inf) = 0 there, never
        # inf * 0 = NaN (and no NaN gradient)
        diff = (Lq[:, :, i:i + 1] - Lk[:, :, :lo]).masked_fill(~same[:, None, i, :lo, None], -math.inf)
        w = torch.exp(diff)                                                # [B, H, lo, K]
        M[:, :, i, :lo] = (q[:, :, i:i + 1] * k[:, :, :lo] * w).sum(-1)
    causal = idx[:, None] >= idx[None, :] if mixer.inclusive else idx[:, None] > idx[None, :]
    M = M * (same & causal)[:, None].to(M.dtype)
    if mixer.normalize:
        M = M / (M.sum(-1, keepdim=True) + NORMALIZE_EPS)
    else:
        M = M * maps.scale
    if mixer.bonus is not None:
        c = mixer.bonus.linear_coefficient
        # a per-value coefficient is not a single weight on v_t: left out like a nonlinear bonus
        if c is not None and shape_class(c) != CLASS_VALUE:
            sc = maps.scale * (maps.q * maps.w * maps.k).sum(-1)         # [B, T, H]
            env = {o.name: _operand_tensor(o, tensors[o.name], shapes, torch.float64) for o in mixer.params}
            env["s"] = sc[..., None]
            coef = evaluate(c, env, (B, T, H, 1), torch.float64, shapes.device)[..., 0]
            if coef.shape[-1:] != (H,):
                raise CallError("bonus coefficient must be per head")  # pragma: no cover - validated at declaration
            M = M + torch.diag_embed(coef.permute(0, 2, 1))
    return M
