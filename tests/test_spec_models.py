"""Each zoo mixer's reference equals the model written out from its paper, independently of mixforge.

The formulas below use only torch on the raw inputs (no mixforge maps, no log-decays where the paper
writes products of gates), in the form the paper states: recurrences, quadratic masked forms, explicit
sums. Norms use torch's own F.rms_norm / F.layer_norm / F.group_norm (eps 1e-5, no weight).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mixforge as mf

from helpers_spec import F64, assert_close, split_sequences, zoo_inputs

EPS_NORM = 1e-5
EPS_DEN = 1e-6
TOL = 1e-10


def silu(x):
    return x * torch.sigmoid(x)


def rms(o):
    return F.rms_norm(o, o.shape[-1:], eps=EPS_NORM)


def group_norm(o):
    """GroupNorm with one group per head over [B, T, H, V], no affine: layer norm of each head."""
    B, T, H, V = o.shape
    return F.group_norm(o.reshape(B * T, H * V), H, eps=EPS_NORM).reshape(B, T, H, V)


def tril(T, diagonal=0):
    return torch.tril(torch.ones(T, T, dtype=F64), diagonal=diagonal)


# --------------------------------------------------------------------------- the papers

def gla(q, k, v, a, g, S0=None):
    """GLA (Yang et al. 2024): S_t = diag(alpha_t) S_{t-1} + k_t v_t^T, alpha_t = sigmoid(a_t)^(1/16);
    o_t = q_t^T S_t / sqrt(K); y = swish(g) * RMSNorm(o)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    alpha = torch.sigmoid(a) ** (1 / 16)
    S = torch.zeros(B, H, K, V, dtype=F64) if S0 is None else S0.clone()
    o = torch.zeros(B, T, H, V, dtype=F64)
    for i in range(T):
        S = alpha[:, i, :, :, None] * S + k[:, i, :, :, None] * v[:, i, :, None, :]
        o[:, i] = torch.einsum("bhk,bhkv->bhv", q[:, i], S) / K ** 0.5
    return silu(g) * rms(o), S


def segsum(x):
    """Mamba-2's stable segment sum (ssd_minimal.py): out[..., i, j] = sum_{j<r<=i} x_r, -inf above."""
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)
    x = x.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=-1), 0)
    x = torch.cumsum(x, dim=-2)
    return x.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), -torch.inf)


def mamba2(x, dt, dt_bias, A_log, B, C, S0=None):
    """SSD (Dao & Gu 2024), quadratic form per head: y = (L o C B^T) (dt x), L = exp(segsum(dt A)),
    dt = softplus(dt + dt_bias), A = -exp(A_log); head h reads group h // (H / G).
    With an initial state: + exp(cumsum(dt A))_t C_t^T S_0."""
    Bsz, T, H, P = x.shape
    G = B.shape[2]
    dt = F.softplus(dt + dt_bias)
    A = -torch.exp(A_log)
    y = torch.zeros_like(x)
    for hd in range(H):
        grp = hd // (H // G)
        Lm = torch.exp(segsum(dt[:, :, hd] * A[hd]))                     # [B, T, T]
        CB = torch.einsum("btn,bsn->bts", C[:, :, grp], B[:, :, grp])
        y[:, :, hd] = torch.einsum("bts,bsp->btp", Lm * CB, x[:, :, hd] * dt[:, :, hd, None])
        if S0 is not None:
            decay = torch.exp(torch.cumsum(dt[:, :, hd] * A[hd], 1))     # [B, T]
            y[:, :, hd] += decay[..., None] * torch.einsum("btn,bnp->btp", C[:, :, grp], S0[:, hd])
    return y


def mamba(x, dt, dt_bias, A_log, B, C):
    """S6 selective scan (Gu & Dao 2023), one channel per head (V = 1), state size N = K:
    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t, A = -exp(A_log) [H, N]."""
    Bsz, T, H, _ = x.shape
    G, N = B.shape[2], B.shape[3]
    dt = F.softplus(dt + dt_bias)                                          # [B, T, H]
    A = -torch.exp(A_log)                                                  # [H, N]
    y = torch.zeros_like(x)
    for ch in range(H):
        grp = ch // (H // G)
        hstate = torch.zeros(Bsz, N, dtype=F64)
        for i in range(T):
            d = dt[:, i, ch, None]
            hstate = torch.exp(d * A[ch]) * hstate + d * B[:, i, grp] * x[:, i, ch]
            y[:, i, ch, 0] = (C[:, i, grp] * hstate).sum(-1)
    return y


def rwkv6(r, k, v, w, u, g):
    """RWKV-6 (Peng et al. 2024): wkv_t = diag(u) k_t^T v_t + sum_{i<t} diag(prod_{j=i+1}^{t-1} w_j) k_i^T v_i,
    w_j = exp(-exp(w_raw_j)); o_t = r_t wkv_t; y = swish(g) * GroupNorm_per_head(o). No scale."""
    B, T, H, K = r.shape
    wd = torch.exp(-torch.exp(w))
    o = torch.zeros(B, T, H, v.shape[-1], dtype=F64)
    for ti in range(T):
        o[:, ti] = (r[:, ti] * u * k[:, ti]).sum(-1, keepdim=True) * v[:, ti]
        for i in range(ti):
            decay = torch.ones(B, H, K, dtype=F64)
            for j in range(i + 1, ti):
                decay = decay * wd[:, j]
            o[:, ti] += (r[:, ti] * decay * k[:, i]).sum(-1, keepdim=True) * v[:, i]
    return silu(g) * group_norm(o)


def hgrn2(q, v, a):
    """HGRN2 (Qin et al. 2024): forget gate f_t = sigmoid(a_t) per key, input key 1 - f_t (tied):
    S_t = diag(f_t) S_{t-1} + (1 - f_t) v_t^T, o_t = q_t^T S_t (scaled by K^-1/2 as the mixer declares)."""
    B, T, H, K = q.shape
    f = torch.sigmoid(a)
    S = torch.zeros(B, H, K, v.shape[-1], dtype=F64)
    o = []
    for i in range(T):
        S = f[:, i, ..., None] * S + (1 - f[:, i])[..., None] * v[:, i, :, None, :]
        o.append(torch.einsum("bhk,bhkv->bhv", q[:, i], S) * K ** -0.5)
    return torch.stack(o, 1)


def retnet(q, k, v, g):
    """RetNet parallel retention (Sun et al. 2023): gamma_h = 1 - 2^(-5-h), D_nm = gamma^(n-m) (n >= m),
    Retention = (Q K^T / sqrt(d) o D) V; y = swish(g) * GroupNorm(Retention)."""
    B, T, H, K = q.shape
    n = torch.arange(T, dtype=F64)
    o = torch.zeros(B, T, H, v.shape[-1], dtype=F64)
    for hd in range(H):
        gamma = 1 - 2.0 ** (-5 - hd)
        D = gamma ** (n[:, None] - n[None, :]) * tril(T)
        att = torch.einsum("btk,bsk->bts", q[:, :, hd], k[:, :, hd]) / K ** 0.5 * D
        o[:, :, hd] = att @ v[:, :, hd]
    return silu(g) * group_norm(o)


def metala(q, v, a, g, u):
    """MetaLA (Chou et al. 2024): alpha_t = sigmoid(a_t)^(1/16), key tied k_t = 1 - alpha_t,
    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = q_t^T S_t / sqrt(K) + sigmoid(s_t v_t),
    s_t = q_t (u o k_t)^T / sqrt(K) (self-augmentation); y = swish(g) * RMSNorm(o)."""
    B, T, H, K = q.shape
    alpha = torch.sigmoid(a) ** (1 / 16)
    k = 1 - alpha
    S = torch.zeros(B, H, K, v.shape[-1], dtype=F64)
    o = []
    for i in range(T):
        S = alpha[:, i, ..., None] * S + k[:, i, ..., None] * v[:, i, :, None, :]
        s_t = (q[:, i] * u * k[:, i]).sum(-1, keepdim=True) / K ** 0.5
        o.append(torch.einsum("bhk,bhkv->bhv", q[:, i], S) / K ** 0.5 + torch.sigmoid(s_t * v[:, i]))
    return silu(g) * rms(torch.stack(o, 1))


def causal_normalized(phi_q, phi_k, v, D=None):
    """o_t = sum_{s<=t} w_ts v_s / (sum_{s<=t} w_ts + 1e-6), w_ts = phi(q_t).phi(k_s) (* D_ts), per head."""
    T = phi_q.shape[1]
    w = torch.einsum("bthk,bshk->bhts", phi_q, phi_k) * tril(T)
    if D is not None:
        w = w * D
    num = torch.einsum("bhts,bshv->bthv", w, v)
    den = w.sum(-1).permute(0, 2, 1)[..., None] + EPS_DEN
    return num / den


def linear_attention(q, k, v, S0=None, z0=None):
    """Katharopoulos et al. 2020, causal: phi = elu + 1; o_t = phi(q_t)^T S_t / (phi(q_t) . z_t + 1e-6)."""
    pq, pk = F.elu(q) + 1, F.elu(k) + 1
    if S0 is None:
        return causal_normalized(pq, pk, v)
    T = q.shape[1]
    w = torch.einsum("bthk,bshk->bhts", pq, pk) * tril(T)
    num = torch.einsum("bhts,bshv->bthv", w, v) + torch.einsum("bthk,bhkv->bthv", pq, S0)
    den = w.sum(-1).permute(0, 2, 1)[..., None] + torch.einsum("bthk,bhk->bth", pq, z0)[..., None] + EPS_DEN
    S_T = S0 + torch.einsum("bshk,bshv->bhkv", pk, v)
    z_T = z0 + pk.sum(1)
    return num / den, (S_T, z_T)


def transnormer(q, k, v, lam, g):
    """TransNormerLLM lightning attention: o = ((silu(Q) silu(K)^T / sqrt(d)) o D) V, D_nm = lambda^(n-m),
    lambda_h = sigmoid(lam_h) per head; y = swish(g) * RMSNorm(o)."""
    B, T, H, K = q.shape
    n = torch.arange(T, dtype=F64)
    o = torch.zeros(B, T, H, v.shape[-1], dtype=F64)
    for hd in range(H):
        D = torch.sigmoid(lam[hd]) ** (n[:, None] - n[None, :]) * tril(T)
        att = torch.einsum("btk,bsk->bts", silu(q[:, :, hd]), silu(k[:, :, hd])) / K ** 0.5 * D
        o[:, :, hd] = att @ v[:, :, hd]
    return silu(g) * rms(o)


def rwkv4(k, v, w, u, r):
    """RWKV-4 WKV in MetaLA's unified row (one key per channel, K = 1): decay e^{-e^w} per step, state
    read before the current token, wkv_t = sum_{i<t} e^{-(t-1-i) e^w} e^{k_i} v_i / (sum_{i<t} ... + 1e-6),
    plus the current token e^{u + k_t} v_t added after the denominator; y = sigmoid(r) * wkv."""
    B, T, H = k.shape
    decay = torch.exp(-torch.exp(w))                                       # [H]
    out = torch.zeros_like(v)
    for ti in range(T):
        num = torch.zeros(B, H, v.shape[-1], dtype=F64)
        den = torch.zeros(B, H, 1, dtype=F64)
        for i in range(ti):
            wt = (decay ** (ti - 1 - i) * torch.exp(k[:, i]))[..., None]
            num, den = num + wt * v[:, i], den + wt
        out[:, ti] = num / (den + EPS_DEN) + torch.exp(u[:, 0] + k[:, ti])[..., None] * v[:, ti]
    return torch.sigmoid(r) * out


def griffin(x, i, r, L):
    """RG-LRU (De et al. 2024): a = sigmoid(Lambda) with Lambda = -L, a_t = a^(c r_t), c = 8,
    r_t = sigmoid(r), i_t = sigmoid(i); h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t); y = h."""
    B, T, H, V = x.shape
    a = torch.sigmoid(-L)
    hstate = torch.zeros(B, H, V, dtype=F64)
    y = torch.zeros_like(x)
    for ti in range(T):
        at = (a ** (8 * torch.sigmoid(r[:, ti])))[..., None]
        hstate = at * hstate + torch.sqrt(1 - at ** 2) * (torch.sigmoid(i[:, ti])[..., None] * x[:, ti])
        y[:, ti] = hstate
    return y


def performer(qw, kw, qn, kn, v):
    """FAVOR+ (Choromanski et al. 2021), causal: phi(x) = exp(w^T x - |x|^2/2) (projection done by the layer)."""
    return causal_normalized(torch.exp(qw - qn[..., None]), torch.exp(kw - kn[..., None]), v)


def rfa(qw, kw, phase, gate, v):
    """Gated RFA (Peng et al. 2021): phi = sin(w^T x + phase); S_t = g_t S_{t-1} + phi(k_t) v_t^T,
    z_t = g_t z_{t-1} + phi(k_t), g_t = sigmoid(gate_t); o_t = phi(q_t)^T S_t / (phi(q_t) . z_t + 1e-6)."""
    B, T, H, K = qw.shape
    pq, pk = torch.sin(qw + phase), torch.sin(kw + phase)
    gt = torch.sigmoid(gate)
    # D_ts = prod_{s<j<=t} g_j
    D = torch.zeros(B, H, T, T, dtype=F64)
    for ti in range(T):
        for s in range(ti + 1):
            D[:, :, ti, s] = torch.prod(gt[:, s + 1:ti + 1], dim=1)
    return causal_normalized(pq, pk, v, D)


def cosformer(q, k, v, freq, phase):
    """cosFormer (Qin et al. 2022): relu features reweighted by cos(t f - phase) per position t (the layer
    duplicates q, k into a cos half and a sin half via phase); causal, normalized."""
    B, T, H, K = q.shape
    pos = torch.arange(T, dtype=F64)[None, :, None, None]
    w = torch.cos(pos * freq[None, None, :, None] - phase)
    return causal_normalized(torch.relu(q) * w, torch.relu(k) * w, v)


# --------------------------------------------------------------------------- tests

def _y(m, x, **kw):
    y, final = mf.reference(m, **x, **kw)
    return y, final


def test_gla():
    m = mf.zoo.gla
    x = zoo_inputs(m, T=10, seed=11)
    y, _ = gla(x["q"], x["k"], x["v"], x["a"], x["g"])
    assert_close(_y(m, x)[0], y, TOL, "gla")


@pytest.mark.parametrize("G", [1, 2, 4])
def test_mamba2_ssd(G):
    m = mf.zoo.mamba2
    x = zoo_inputs(m, T=10, seed=12, G=G)
    ref = mamba2(x["x"], x["dt"], x["dt_bias"], x["A_log"], x["B"], x["C"])
    assert_close(_y(m, x)[0], ref, TOL, f"mamba2 G={G}")


def test_mamba_selective_scan():
    m = mf.zoo.mamba
    x = zoo_inputs(m, T=10, seed=13)
    assert x["x"].shape[-1] == 1 and x["A_log"].shape == (4, 4) and x["B"].shape[2] == 2
    ref = mamba(x["x"], x["dt"], x["dt_bias"], x["A_log"], x["B"], x["C"])
    assert_close(_y(m, x)[0], ref, TOL, "mamba")


def test_rwkv6():
    m = mf.zoo.rwkv6
    x = zoo_inputs(m, T=9, seed=14)
    ref = rwkv6(x["r"], x["k"], x["v"], x["w"], x["u"], x["g"])
    assert_close(_y(m, x)[0], ref, TOL, "rwkv6")


def test_hgrn2():
    m = mf.zoo.hgrn2
    x = zoo_inputs(m, T=10, seed=15)
    assert_close(_y(m, x)[0], hgrn2(x["q"], x["v"], x["a"]), TOL, "hgrn2")


def test_retnet():
    m = mf.zoo.retnet
    x = zoo_inputs(m, T=12, seed=16, H=4)
    assert_close(_y(m, x)[0], retnet(x["q"], x["k"], x["v"], x["g"]), TOL, "retnet")


def test_metala():
    m = mf.zoo.metala
    x = zoo_inputs(m, T=10, seed=17)
    assert_close(_y(m, x)[0], metala(x["q"], x["v"], x["a"], x["g"], x["u"]), TOL, "metala")


def test_linear_attention():
    m = mf.zoo.linear_attention
    x = zoo_inputs(m, T=10, seed=18)
    assert_close(_y(m, x)[0], linear_attention(x["q"], x["k"], x["v"]), TOL, "linear_attention")


def test_transnormer():
    m = mf.zoo.transnormer
    x = zoo_inputs(m, T=10, seed=19)
    assert_close(_y(m, x)[0], transnormer(x["q"], x["k"], x["v"], x["lam"], x["g"]), TOL, "transnormer")


def test_rwkv4():
    m = mf.zoo.rwkv4
    x = zoo_inputs(m, T=9, seed=20, K=1)
    assert x["u"].shape == (2, 1)
    assert_close(_y(m, x)[0], rwkv4(x["k"], x["v"], x["w"], x["u"], x["r"]), TOL, "rwkv4")


def test_griffin():
    m = mf.zoo.griffin
    x = zoo_inputs(m, T=10, seed=21)
    assert_close(_y(m, x)[0], griffin(x["x"], x["i"], x["r"], x["L"]), TOL, "griffin")


def test_performer():
    m = mf.zoo.performer
    x = zoo_inputs(m, T=10, seed=22)
    assert_close(_y(m, x)[0], performer(x["qw"], x["kw"], x["qn"], x["kn"], x["v"]), TOL, "performer")


def test_rfa():
    m = mf.zoo.rfa
    x = zoo_inputs(m, T=10, seed=23)
    assert_close(_y(m, x)[0], rfa(x["qw"], x["kw"], x["phase"], x["gate"], x["v"]), 1e-9, "rfa")


def test_cosformer():
    m = mf.zoo.cosformer
    x = zoo_inputs(m, T=10, seed=24)
    assert_close(_y(m, x)[0], cosformer(x["q"], x["k"], x["v"], x["freq"], x["phase"]), TOL, "cosformer")


def test_every_zoo_mixer_has_a_paper_formula_here():
    tested = {n[len("test_"):].split("_")[0] for n in globals() if n.startswith("test_")}
    tested |= {"linear_attention", "mamba2"}
    assert set(mf.zoo.ALL) <= tested, set(mf.zoo.ALL) - tested


# --------------------------------------------------------------------------- states

def test_gla_initial_and_final_state():
    m = mf.zoo.gla
    x = zoo_inputs(m, T=8, seed=25)
    S0 = torch.randn(2, 2, 4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    y_ref, S_ref = gla(x["q"], x["k"], x["v"], x["a"], x["g"], S0=S0)
    y, S = mf.reference(m, **x, initial_state=S0, output_final_state=True)
    assert_close(y, y_ref, TOL, "gla y with S_0")
    assert_close(S, S_ref, TOL, "gla S_T")
    # the state really matters
    assert (mf.reference(m, **x)[0] - y).abs().max() > 1e-3


def test_initial_state_float32_is_accepted_and_final_state_is_not_returned_unasked():
    m = mf.zoo.gla
    x = zoo_inputs(m, T=5, seed=26)
    S0 = torch.randn(2, 2, 4, 3, dtype=torch.float32)
    y, S = mf.reference(m, **x, initial_state=S0)
    assert S is None
    y_ref, _ = gla(x["q"], x["k"], x["v"], x["a"], x["g"], S0=S0.double())
    assert_close(y, y_ref, TOL, "float32 S_0")


def test_linear_attention_state_pair():
    m = mf.zoo.linear_attention
    x = zoo_inputs(m, T=8, seed=27)
    gen = torch.Generator().manual_seed(1)
    S0 = torch.randn(2, 2, 4, 3, dtype=F64, generator=gen)
    z0 = torch.rand(2, 2, 4, dtype=F64, generator=gen) + 0.5
    y_ref, (S_ref, z_ref) = linear_attention(x["q"], x["k"], x["v"], S0, z0)
    y, (S, z) = mf.reference(m, **x, initial_state=(S0, z0), output_final_state=True)
    assert_close(y, y_ref, TOL, "linear attention y with (S_0, z_0)")
    assert_close(S, S_ref, TOL, "S_T")
    assert_close(z, z_ref, TOL, "z_T")


def test_mamba2_initial_state():
    m = mf.zoo.mamba2
    x = zoo_inputs(m, T=8, seed=28)
    S0 = torch.randn(2, 4, 4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    ref = mamba2(x["x"], x["dt"], x["dt_bias"], x["A_log"], x["B"], x["C"], S0=S0)
    assert_close(mf.reference(m, **x, initial_state=S0)[0], ref, TOL, "mamba2 with S_0")


@pytest.mark.parametrize("name", sorted(mf.zoo.ALL))
def test_prefill_then_continue_equals_one_pass(name):
    """Running T1 tokens, then the rest from the final state, equals one pass over all T tokens."""
    m = mf.zoo.ALL[name]
    x = zoo_inputs(m, B=2, T=11, seed=29)
    y, final = mf.reference(m, **x, output_final_state=True)
    first = {o.name: (x[o.name][:, :4] if isinstance(o, mf.Input) else x[o.name]) for o in m.operands}
    rest = {o.name: (x[o.name][:, 4:] if isinstance(o, mf.Input) else x[o.name]) for o in m.operands}
    y1, s1 = mf.reference(m, **first, output_final_state=True)
    y2, s2 = mf.reference(m, **rest, initial_state=s1, output_final_state=True)
    if "t" in {str(sym) for e in m.maps.values() for sym in e.free_symbols}:
        # position-dependent maps (cosformer) restart t at a new call: only the first part must agree
        assert_close(y1, y[:, :4], TOL, f"{name} prefix")
        return
    assert_close(torch.cat([y1, y2], 1), y, TOL, f"{name} prefill + continue")
    for a, b in zip(s2 if m.normalize else [s2], final if m.normalize else [final]):
        assert_close(a, b, TOL, f"{name} final state")


@pytest.mark.parametrize("name", sorted(mf.zoo.ALL))
def test_cu_seqlens_equals_separate_sequences(name):
    m = mf.zoo.ALL[name]
    cu = torch.tensor([0, 3, 3, 10, 12], dtype=torch.int32)
    x = zoo_inputs(m, B=1, T=12, seed=30)
    N = len(cu) - 1
    ref_K = {"griffin": 1}.get(name, 4)
    H, V = (4, 1) if name == "mamba" else (4, 3) if name == "mamba2" else (2, 3)
    gen = torch.Generator().manual_seed(3)
    S0 = torch.randn(N, H, ref_K, V, dtype=F64, generator=gen)
    state = (S0, torch.rand(N, H, ref_K, dtype=F64, generator=gen) + 0.5) if m.normalize else S0
    y, final = mf.reference(m, **x, cu_seqlens=cu, initial_state=state, output_final_state=True)
    assert y.shape[:2] == (1, 12)
    for n, xs in enumerate(split_sequences(m, x, cu)):
        s, e = cu[n].item(), cu[n + 1].item()
        st = (state[0][n:n + 1], state[1][n:n + 1]) if m.normalize else state[n:n + 1]
        y_n, f_n = mf.reference(m, **xs, initial_state=st, output_final_state=True)
        if e > s:
            assert_close(y[:, s:e], y_n, TOL, f"{name} sequence {n}")
        for a, b in zip(final if m.normalize else [final], f_n if m.normalize else [f_n]):
            assert_close(a[n:n + 1], b, TOL, f"{name} final state of sequence {n}")
    # an empty sequence passes its initial state through untouched
    empty = final[0][1] if m.normalize else final[1]
    assert torch.equal(empty, S0[1])
