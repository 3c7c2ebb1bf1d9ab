"""The float64 recurrence equals the parallel form (implicit attention) for every zoo mixer.

ALGORITHMS.md §2: o_t = sum_{s<=t} M[t,s] v_s (+ bonus) (+ scale (q_t e^{L_t})^T S_0), with
exclusive mixers reading L_{t-1}; S_T = sum_s (k_s e^{L_T - L_s}) v_s^T + e^{L_T} S_0.
"""
from __future__ import annotations

import pytest
import torch

import mixforge as mf
from mixforge.spec.reference import recurrence

from helpers_spec import F64, assert_close, parallel_form, zoo_dims, zoo_inputs

ZOO = sorted(mf.zoo.ALL)
# an empty sequence in the middle and one at the end, odd lengths, T = 13
CU = torch.tensor([0, 4, 4, 11, 13, 13], dtype=torch.int64)


def _state(m, N, H, K, V, seed):
    gen = torch.Generator().manual_seed(seed)
    S0 = torch.randn(N, H, K, V, generator=gen, dtype=F64)
    if m.normalize:   # z_0 > 0 keeps the denominators away from zero
        return S0, torch.rand(N, H, K, generator=gen, dtype=F64) + 0.5
    return S0


def _check(m, x, *, cu_seqlens=None, initial_state=None):
    r = recurrence(m, cu_seqlens=cu_seqlens, initial_state=initial_state, output_final_state=True, **x)
    o, final = parallel_form(m, x, cu_seqlens=cu_seqlens, initial_state=initial_state)
    assert_close(r.o, o, what=f"{m.name}: recurrence o vs parallel form")
    if m.normalize:
        assert_close(r.final_state[0], final[0], what=f"{m.name}: final S")
        assert_close(r.final_state[1], final[1], what=f"{m.name}: final z")
    else:
        assert_close(r.final_state, final, what=f"{m.name}: final state")


@pytest.mark.parametrize("name", ZOO)
def test_parallel_form_odd_T_K_ne_V(name):
    m = mf.zoo.ALL[name]
    x = zoo_inputs(m, B=2, T=9, seed=1)
    _check(m, x)


@pytest.mark.parametrize("name", ZOO)
def test_parallel_form_strong_decay(name):
    m = mf.zoo.ALL[name]
    x = zoo_inputs(m, B=2, T=11, seed=2, decay="strong")
    _check(m, x)


@pytest.mark.parametrize("name", ZOO)
def test_parallel_form_varlen_with_empty_sequence(name):
    m = mf.zoo.ALL[name]
    x = zoo_inputs(m, B=1, T=13, seed=3)
    _check(m, x, cu_seqlens=CU)


@pytest.mark.parametrize("name", ZOO)
def test_parallel_form_initial_state(name):
    m = mf.zoo.ALL[name]
    d = zoo_dims(name)
    x = zoo_inputs(m, B=2, T=7, seed=4)
    K = 1 if name in ("griffin",) else d["K"]
    _check(m, x, initial_state=_state(m, 2, d["H"], K, d["V"], seed=5))


@pytest.mark.parametrize("name", ZOO)
def test_parallel_form_varlen_initial_state_strong(name):
    m = mf.zoo.ALL[name]
    d = zoo_dims(name)
    x = zoo_inputs(m, B=1, T=13, seed=6, decay="strong")
    K = 1 if name in ("griffin",) else d["K"]
    _check(m, x, cu_seqlens=CU, initial_state=_state(m, len(CU) - 1, d["H"], K, d["V"], seed=7))


@pytest.mark.parametrize("name", ZOO)
def test_attention_map_is_causal_and_blocked_by_sequence(name):
    m = mf.zoo.ALL[name]
    x = zoo_inputs(m, B=1, T=13, seed=8)
    M = mf.attention_map(m, cu_seqlens=CU, **x)
    T = 13
    assert M.shape == (1, zoo_dims(name)["H"], T, T) and M.dtype == F64
    seq = torch.zeros(T, dtype=torch.long)
    for n, (s, e) in enumerate(zip(CU.tolist(), CU.tolist()[1:])):
        seq[s:e] = n
    i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    allowed = (seq[i] == seq[j]) & (j <= i)
    assert (M[..., ~allowed] == 0).all(), "M has weight outside its own sequence's causal past"
    # exclusive mixers see the current token only through the bonus diagonal; inclusive ones through M
    below = allowed & (j < i)
    assert (M[..., below] != 0).any()
    assert (M.diagonal(dim1=-2, dim2=-1) != 0).any() == (m.inclusive or m.bonus is not None)


def test_grouped_heads_share_their_group():
    """mamba2 with G=2, H=4: heads 0,1 read group 0 and heads 2,3 group 1 (h // (H/G))."""
    m = mf.zoo.mamba2
    x = zoo_inputs(m, B=1, T=6, seed=9)
    M = mf.attention_map(m, **x)
    # swapping the groups of B and C and the halves of the per-head tensors permutes the heads
    perm = [2, 3, 0, 1]
    y = {"B": x["B"].flip(2), "C": x["C"].flip(2), "x": x["x"][:, :, perm], "dt": x["dt"][:, :, perm],
         "dt_bias": x["dt_bias"][perm], "A_log": x["A_log"][perm]}
    M2 = mf.attention_map(m, **y)
    assert_close(M2, M[:, perm], what="grouped head permutation")
    assert not torch.allclose(M[:, 0], M[:, 2])


def test_strong_decay_really_is_strong():
    """random_inputs(decay='strong') drives the most negative log-decay to about -20."""
    from helpers_spec import call_maps

    for name in ("gla", "mamba2", "rwkv6"):
        m = mf.zoo.ALL[name]
        g = call_maps(m, zoo_inputs(m, decay="strong")).gamma
        assert -21 < g.min().item() < -19, name


def test_strong_decay_of_a_non_monotone_form():
    """fa = -a^2/2 is strongest on both sides of 0: 'strong' still means about -20, not -1000."""
    from helpers_spec import call_maps

    a = mf.Input("a")
    m = mf.Mixer("sq", fq=mf.Input("q"), fk=mf.Input("k"), fv=mf.Input("v", dim="value"), fa=-a ** 2 / 2)
    g = call_maps(m, zoo_inputs(m, decay="strong")).gamma
    assert -21 < g.min().item() < -19


@pytest.mark.parametrize("name", ["gla", "hgrn2", "rfa", "transnormer", "rwkv6"])
def test_varlen_long_sequences_strong_decay_no_overflow(name):
    """Across a sequence boundary the cumulative decay restarts: L_i - L_j of two sequences is huge
    (about +800 here), and must give weight 0, not exp(800) * 0 = NaN, in M and in its gradient."""
    m = mf.zoo.ALL[name]
    cu = torch.tensor([0, 40, 41, 43], dtype=torch.int64)
    x = zoo_inputs(m, B=1, T=43, seed=10, decay="strong")
    _check(m, x, cu_seqlens=cu)
    x = {n: t.requires_grad_() for n, t in x.items()}
    M = mf.attention_map(m, cu_seqlens=cu, **x)
    assert torch.isfinite(M).all()
    M.sum().backward()
    for n, t in x.items():
        assert t.grad is None or torch.isfinite(t.grad).all(), n
