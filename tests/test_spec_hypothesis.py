"""Random valid declarations from the declaration language: recurrence == parallel form, JSON round trip.

Hypothesis draws the five maps from mixforge.functions applied to Inputs and Params of the right shape
classes, a decay kind (none / constant / scalar / per key) written in forms that are provably <= 0, and
the options (inclusive, normalize, norm, gate, bonus, scale) within the rules; then random shapes,
a varlen split and an initial state. The number of examples comes from the profile in conftest.py.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from sympy import Rational

from mixforge import Bonus, Input, Mixer, Param, h, s, t, value
from mixforge.functions import cos, elu, exp, log1p, logsigmoid, relu, sigmoid, silu, sin, softplus, tanh
from mixforge.spec import UndecidedDecayWarning
from mixforge.spec.reference import NORM_EPS, recurrence
from mixforge.spec.shapes import REFERENCE_DTYPES, resolve_call
from mixforge.spec.testing import random_inputs

from helpers_spec import F64, RTOL, call_maps, parallel_form

# ---- the operand pool: one object per name, so names never clash
q, k = Input("q"), Input("k")
c = Input("c", grouped=True)                     # Mamba-2's B/C style
v, g = Input("v", dim="value"), Input("g", dim="value")
d = Input("d", dim=None)                         # per head and token
pk, pv, ph = Param("pk"), Param("pv", dim="value"), Param("ph", dim=None)
# operands only the decay uses (random_inputs shifts them to make decays strong)
a, e = Input("a"), Input("e", dim=None)
ak, ah, ah2 = Param("ak"), Param("ah", dim=None), Param("ah2", dim=None)
# bonus operands
u, pb, pbh = Param("u"), Param("pb", dim="value"), Param("pbh", dim=None)

ANY_FEATURES = [lambda x: x, sigmoid, silu, tanh, elu, relu, softplus, sin, cos, exp, lambda x: elu(x) + 1]
POSITIVE_FEATURES = [exp, sigmoid, softplus, lambda x: elu(x) + 1, lambda x: relu(x) + Rational(1, 2),
                     lambda x: 1 + x ** 2]
COEFFS = [Rational(1, 16), Rational(1, 2), Rational(1), Rational(3, 2), 0.0625, 1 / 3]


@st.composite
def key_map(draw, positive: bool):
    """fq or fk: a feature map of a per-key input, maybe scaled per key / per token / by position."""
    choice = draw(st.sampled_from(["key", "key", "key", "scalar", "const"]))
    if choice == "const":
        return draw(st.sampled_from([1, 2]))
    if choice == "scalar":
        return draw(st.sampled_from(POSITIVE_FEATURES if positive else ANY_FEATURES))(d)
    expr = draw(st.sampled_from(POSITIVE_FEATURES if positive else ANY_FEATURES))(draw(st.sampled_from([q, k, c])))
    mods = ["none", "param", "scalar", "coef"] + ([] if positive else ["position"])
    mod = draw(st.sampled_from(mods))
    if mod == "param":
        expr = expr * exp(pk)
    elif mod == "scalar":
        expr = expr * sigmoid(d)
    elif mod == "coef":
        expr = expr * draw(st.sampled_from(COEFFS))
    elif mod == "position":
        expr = expr * cos(t * ph - pk)
    return expr


@st.composite
def decay(draw):
    kind = draw(st.sampled_from(["none", "constant", "scalar", "key"]))
    coef = draw(st.sampled_from(COEFFS))
    if kind == "none":
        return None
    if kind == "constant":
        return draw(st.sampled_from([logsigmoid(ah) * coef, -exp(ah), -softplus(ah) * coef,
                                     log1p(-2 ** (-5 - h)), -coef, -softplus(ah) - exp(ah2)]))
    if kind == "scalar":
        return draw(st.sampled_from([logsigmoid(e) * coef, -exp(e), -softplus(e + ah) * exp(ah2),
                                     logsigmoid(e) - softplus(ah)]))
    return draw(st.sampled_from([logsigmoid(a) * coef, -exp(a), -softplus(a) * exp(ak),
                                 -softplus(e + ah) * exp(ak), logsigmoid(a) * coef - exp(e), -a ** 2 * coef]))


@st.composite
def declarations(draw) -> Mixer:
    normalize = draw(st.booleans())
    fa = draw(decay())
    fq = draw(key_map(normalize))
    if fa is not None and draw(st.booleans()):
        fk = 1 - exp(fa)                          # tied key (HGRN2, MetaLA)
    else:
        fk = draw(key_map(normalize))
    fv = draw(st.sampled_from([v, silu(v), v * sigmoid(d), v * exp(pv), tanh(v) + v, sigmoid(d)]))
    fg = draw(st.sampled_from([None, silu(g), sigmoid(g), g, sigmoid(d), exp(pv) * silu(g)]))
    norm = None if normalize else draw(st.sampled_from([None, "rms", "layer"]))
    bonus = None
    if draw(st.booleans()):
        weight = draw(st.sampled_from([u, exp(u)]))
        term = draw(st.sampled_from([s * value, sigmoid(s * value), tanh(s) * value, s * value * exp(pb),
                                     value * exp(pbh), s * value + sigmoid(value) * pbh]))
        bonus = Bonus(weight=weight, term=term)
    scale = draw(st.sampled_from([None, None, 1.0, 0.5, 1 / 3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndecidedDecayWarning)   # every drawn decay is provably <= 0
        return Mixer("hyp", fq=fq, fk=fk, fv=fv, fa=fa, fg=fg, normalize=normalize,
                     inclusive=draw(st.booleans()), scale=scale, norm=norm, bonus=bonus)


@st.composite
def calls(draw):
    m = draw(declarations())
    H = draw(st.sampled_from([1, 2, 4]))
    G = draw(st.sampled_from([x for x in (1, 2, 4) if H % x == 0]))
    K, V = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    T = draw(st.integers(1, 10))
    varlen = draw(st.booleans())
    B = 1 if varlen else draw(st.integers(1, 2))
    x = random_inputs(m, B=B, T=T, H=H, K=K, V=V, G=G, dtype=F64, seed=draw(st.integers(0, 2 ** 16)),
                      decay=draw(st.sampled_from(["normal", "strong", "weak"])))
    cu = None
    if varlen:
        cuts = sorted(draw(st.lists(st.integers(0, T), max_size=3)))
        cu = torch.tensor([0, *cuts, T], dtype=draw(st.sampled_from([torch.int32, torch.int64])))
    shapes = resolve_call(m, x, cu_seqlens=cu, dtypes=REFERENCE_DTYPES)
    state = None
    if draw(st.booleans()):
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
        S0 = torch.randn(shapes.N, shapes.H, shapes.K, shapes.V, generator=gen, dtype=F64)
        state = (S0, torch.rand(shapes.N, shapes.H, shapes.K, generator=gen, dtype=F64) + 0.5) if m.normalize else S0
    return m, x, cu, state


def close(out, ref, what):
    assert torch.isfinite(out).all() and torch.isfinite(ref).all(), f"{what}: not finite"
    err = (out - ref).norm()
    assert err <= RTOL * ref.norm(), f"{what}: relative error {(err / ref.norm()).item():.3e}"


def norm(kind, o):
    if kind == "rms":
        return F.rms_norm(o, o.shape[-1:], eps=NORM_EPS)
    if kind == "layer":
        return F.layer_norm(o, o.shape[-1:], eps=NORM_EPS)
    return o


@given(calls())
def test_recurrence_equals_parallel_form(call):
    m, x, cu, state = call
    try:
        _check_parallel_form(m, x, cu, state)
    except AssertionError as err:
        err.add_note(m.describe())
        raise


def _check_parallel_form(m, x, cu, state):
    r = recurrence(m, cu_seqlens=cu, initial_state=state, output_final_state=True, **x)
    o, final = parallel_form(m, x, cu_seqlens=cu, initial_state=state)
    close(r.o, o, "o")
    maps = call_maps(m, x, cu)
    y = norm(m.norm, o)
    if maps.g is not None:
        y = maps.g * y
    close(r.y, y, "y")
    if m.normalize:
        close(r.final_state[0], final[0], "S_T")
        close(r.final_state[1], final[1], "z_T")
    else:
        close(r.final_state, final, "S_T")


@given(declarations())
def test_json_round_trip(m):
    m2 = Mixer.from_json(m.to_json())
    assert m2 == m
    assert m2.content_hash == m.content_hash
    assert m2.decay_kind == m.decay_kind and m2.classes == m.classes
    assert Mixer.from_dict(m.to_dict()).describe() == m.describe()
