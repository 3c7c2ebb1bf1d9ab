"""Random declarations through the whole pipeline: plan, printer, templates, kernels, chain rule.

The mixers come from the spec tests' declaration grammar (test_spec_hypothesis.declarations); every
example generates, caches and loads its own module, so the number of examples is a quarter of the
active hypothesis profile's (conftest.py: dev, ci, thorough).
"""
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mixforge as mf
from mixforge.spec.shapes import resolve_call
from mixforge.spec.testing import random_inputs
from test_spec_hypothesis import declarations

from helpers_codegen import check_call

EXAMPLES = max(3, settings().max_examples // 4)


@st.composite
def calls(draw):
    m = draw(declarations())
    H = 2
    G = draw(st.sampled_from([1, 2]))
    K, V = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    # a layer norm of a row that is constant over V (a scalar fv, or V = 1) is 0 up to rounding:
    # y and the gate's gradient are pure noise, nothing to compare
    assume(not (m.norm == "layer" and (V == 1 or m.classes["fv"] != "value")))
    T = draw(st.integers(1, 9))
    varlen = draw(st.booleans())
    B = 1 if varlen else draw(st.integers(1, 2))
    x = random_inputs(m, B=B, T=T, H=H, K=K, V=V, G=G, seed=draw(st.integers(0, 2 ** 16)),
                      decay=draw(st.sampled_from(["normal", "strong", "weak"])))
    cu = None
    if varlen:
        cuts = sorted(draw(st.lists(st.integers(0, T), max_size=3)))
        cu = torch.tensor([0, *cuts, T], dtype=torch.int32)
    shapes = resolve_call(m, x, cu_seqlens=cu)
    state = None
    if draw(st.booleans()):
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
        S0 = torch.randn(shapes.N, shapes.H, shapes.K, shapes.V, generator=gen)
        state = (S0, torch.rand(shapes.N, shapes.H, shapes.K, generator=gen) + 0.5) if m.normalize else S0
    return m, x, cu, state


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls())
def test_random_mixers_match_the_reference(call):
    m, x, cu, state = call
    try:
        check_call(m, mf.compile(m).recurrent, x, initial_state=state, cu_seqlens=cu, floor=1e-2)
    except AssertionError as err:
        err.add_note(m.describe())
        raise
