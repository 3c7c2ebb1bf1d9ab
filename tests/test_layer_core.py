"""MixerLayer: projections, parameter inits, convs, and the three call modes (train, prefill, decode).

The call-mode tests run on `ops_for` (the generated kernels, under Triton's
interpreter; the float64 stand-in only where `mixforge.compile` is missing).
The wiring tests that sweep the whole zoo use the stand-in on purpose: they
check projections and parameters, and the interpreter would cost minutes.
Everything runs in fp32 on the CPU.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import mixforge as mf
from mixforge.layer import MixerLayer, MixerState, default_conv_inputs, long_conv, short_conv
from mixforge.spec.errors import CallError, SpecError
from test_layer_standin import ReferenceOps, ops_for

D, H = 24, 2


def make(name, standin=False, **kw):
    torch.manual_seed(kw.pop("seed", 0))
    ops = ReferenceOps(name) if standin else ops_for(name)
    return MixerLayer(name, kw.pop("d_model", D), kw.pop("num_heads", H), ops=ops, **kw)


def close(a, b, tol=2e-5):
    err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    assert err < tol, f"relative error {err:.2e} >= {tol}"


# --------------------------------------------------------------------------- construction

def test_gla_projections_and_low_rank_decay():
    layer = make("gla", True)
    K = V = D // H
    assert layer.proj.out_features == 2 * H * K + 2 * H * V          # q, k, v, g fused
    down, up = layer.low_rank["a"]
    assert (down.in_features, down.out_features, up.out_features) == (D, 16, H * K)
    assert up.bias is not None and down.bias is None
    assert layer.o_proj.in_features == H * V and layer.o_proj.out_features == D
    assert set(layer.params) == set()                               # GLA has no Params


def test_grouped_inputs_and_scalar_inputs_mamba2():
    layer = make("mamba2", True, num_heads=4, head_dim_k=8, head_dim_v=6, num_groups=2)
    raw = layer.mixer_inputs(torch.randn(2, 5, D))
    assert raw["B"].shape == raw["C"].shape == (2, 5, 2, 8)
    assert raw["x"].shape == (2, 5, 4, 6)
    assert raw["dt"].shape == (2, 5, 4)
    assert raw["A_log"].shape == raw["dt_bias"].shape == (4,)
    assert layer.D is not None and layer.d_skip == "x"
    with pytest.raises(SpecError, match="num_groups"):
        make("mamba2", True, num_heads=4, num_groups=3)


def test_default_conv_inputs_are_qkv_like():
    assert default_conv_inputs(mf.zoo.gla) == ("q", "k", "v")
    assert default_conv_inputs(mf.zoo.metala) == ("q", "v")        # its key is tied to the decay
    assert set(default_conv_inputs(mf.zoo.mamba2)) == {"B", "C", "x"}  # as Mamba's conv
    layer = make("gla", True, conv_inputs=("v",))
    assert layer.conv_weight.shape == (H * (D // H), 4)
    with pytest.raises(SpecError, match="conv_inputs names 'z'"):
        make("gla", True, conv_inputs=("z",))


def test_param_inits_follow_each_system():
    torch.manual_seed(0)
    m2 = make("mamba2", True, num_heads=8)
    A = m2.params["A_log"].exp()
    assert ((A >= 1) & (A <= 16)).all()
    dt = F.softplus(m2.params["dt_bias"])
    assert ((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001)).all()
    m1 = make("mamba", True, num_heads=4, head_dim_k=6)
    assert m1.head_dim_v == 1 and m1.low_rank["dt"][0].out_features == math.ceil(D / 16)
    torch.testing.assert_close(m1.params["A_log"], torch.log(torch.arange(1.0, 7.0)).expand(4, 6))
    assert len(make("retnet", True).params) == 0
    tn = make("transnormer", True, num_heads=3)
    torch.testing.assert_close(torch.sigmoid(tn.params["lam"]), 1 - 2.0 ** (-5 - torch.arange(3.0)))
    r4 = make("rwkv4", True, num_heads=5)
    w = r4.params["w"].detach()
    assert w[0].item() == pytest.approx(-5.0) and w[-1].item() == pytest.approx(3.0) and (w.diff() > 0).all()
    assert torch.exp(r4.params["u"]).mean().item() == pytest.approx(0.3, rel=0.2)
    assert make("rwkv6", True).params["u"].abs().max() <= 0.1 + 1e-6
    gr = make("griffin", True)
    a8 = torch.exp(-8 * F.softplus(gr.params["L"]))
    assert ((a8 >= 0.9 - 1e-5) & (a8 <= 0.999 + 1e-5)).all()
    cf = make("cosformer", True)
    assert not cf.params["phase"].requires_grad and not cf.params["freq"].requires_grad
    assert cf.params["phase"][0, -1].item() == pytest.approx(math.pi / 2) and cf.params["phase"][0, 0] == 0


def test_generic_fallback_and_overrides():
    from mixforge import Input, Mixer, Param
    from mixforge.functions import logsigmoid

    q, k, v = Input("q"), Input("k"), Input("v", dim="value")
    mix = Mixer("custom", fq=q, fk=k, fv=v, fa=logsigmoid(Param("zeta", dim=None)) + logsigmoid(Param("eta")))
    torch.manual_seed(0)
    layer = MixerLayer(mix, 64, 16, ops=ReferenceOps(mix))
    assert 0.05 < layer.params["eta"].std().item() < 0.15                # N(0, 0.1^2)
    layer = MixerLayer(mix, 64, 16, ops=ReferenceOps(mix),
                       param_init={"zeta": torch.full((16,), 3.0), "eta": lambda shape: torch.zeros(shape)})
    assert (layer.params["zeta"] == 3).all() and (layer.params["eta"] == 0).all()
    with pytest.raises(SpecError, match="not a parameter"):
        MixerLayer(mix, 64, 16, ops=ReferenceOps(mix), param_init={"nope": 1.0})
    with pytest.raises(SpecError, match="shape"):
        MixerLayer(mix, 64, 16, ops=ReferenceOps(mix), param_init={"zeta": torch.zeros(3)})
    with pytest.raises(SpecError, match="low_rank names 'x'"):
        MixerLayer(mix, 64, 16, ops=ReferenceOps(mix), low_rank={"x": 4})
    with pytest.raises(SpecError, match="positive integer"):
        MixerLayer(mix, 64, 16, ops=ReferenceOps(mix), low_rank={"q": 0})
    layer = MixerLayer(mix, 64, 16, ops=ReferenceOps(mix), low_rank={"q": 8})
    assert layer.low_rank["q"][0].out_features == 8 and "q" not in layer._full_names


def test_zoo_defaults_apply_only_to_the_zoo_declaration():
    from mixforge import Input, Mixer
    from mixforge.functions import logsigmoid, silu

    q, k, a = Input("q"), Input("k"), Input("a")
    v, g = Input("v", dim="value"), Input("g", dim="value")
    other = Mixer("gla", fq=q, fk=k, fv=v, fa=logsigmoid(a) / 8, fg=silu(g))   # same name, other maps
    assert len(MixerLayer(other, D, H, ops=ReferenceOps(other)).low_rank) == 0
    assert "a" in make("gla", True).low_rank


# --------------------------------------------------------------------------- convolutions

def _conv_loop(x, w, hist):
    """y_t = sum_j w[:, W-1-j] x_{t-j}, with the history before x."""
    W = w.shape[1]
    xp = torch.cat([hist, x], 1)
    out = []
    for t in range(x.shape[1]):
        window = xp[:, t:t + W]                                     # oldest .. newest
        out.append((window * w.t()[None]).sum(1))
    return torch.stack(out, 1) if out else x.clone()


def test_short_conv_packed_matches_per_sequence_with_caches():
    torch.manual_seed(1)
    C, W = 5, 4
    w = torch.randn(C, W)
    lens = [3, 0, 1, 7]
    cu = torch.tensor([0, 3, 3, 4, 11])
    x = torch.randn(1, 11, C)
    cache = torch.randn(4, W - 1, C)
    y, new = short_conv(x, w, cache, cu)
    for n, L in enumerate(lens):
        xs = x[:, cu[n]:cu[n + 1]]
        want = _conv_loop(xs, w, cache[n:n + 1])
        torch.testing.assert_close(y[:, cu[n]:cu[n + 1]], want)
        ys, cs = short_conv(xs, w, cache[n:n + 1])                   # the unpacked path agrees
        torch.testing.assert_close(ys, want)
        torch.testing.assert_close(new[n:n + 1], cs)
        torch.testing.assert_close(cs, torch.cat([cache[n:n + 1], xs], 1)[:, -(W - 1):])
    # no cache: zeros before each sequence
    y0, _ = short_conv(x, w, None, cu)
    torch.testing.assert_close(y0[:, 4:], _conv_loop(x[:, 4:], w, torch.zeros(1, W - 1, C)))


def test_long_conv_fft_matches_direct_sum_and_decoding():
    torch.manual_seed(2)
    C, L, T = 3, 6, 9
    k = torch.randn(C, L)
    x = torch.randn(2, T, C)
    hist = torch.randn(2, L - 1, C)
    y, cache = long_conv(x, k, hist)
    torch.testing.assert_close(y, _conv_loop(x, k.flip(1), hist), rtol=1e-5, atol=1e-5)
    ys, c = [], hist
    for t in range(T):
        yt, c = long_conv(x[:, t:t + 1], k, c)
        ys.append(yt)
    torch.testing.assert_close(torch.cat(ys, 1), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, cache)


# --------------------------------------------------------------------------- the three modes

@pytest.mark.parametrize("name", sorted(mf.zoo.ALL))
def test_every_zoo_mixer_trains(name):
    """Forward runs, the output depends on x, and every trainable parameter gets a gradient."""
    layer = make(name, standin=True, num_heads=2, head_dim_k=4, head_dim_v=4, num_groups=2, long_conv=True,
                 long_conv_len=6)
    x = torch.randn(2, 9, D, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    missing = [n for n, p in layer.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient for {missing}"
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name,kw", [
    ("gla", {}),
    ("metala", {"long_conv": True, "long_conv_len": 5}),
    ("mamba2", {"num_groups": 2, "num_heads": 4}),
    ("linear_attention", {}),                     # normalize: the state is (S, z)
    ("cosformer", {}),                            # depends on the position t
    ("retnet", {"short_conv": False}),
])
def test_prefill_then_steps_equals_one_pass(name, kw):
    layer = make(name, **kw)
    x = torch.randn(2, 11, D)
    y = layer(x)
    y1, state = layer(x[:, :6], use_cache=True)
    assert isinstance(state, MixerState) and state.position.tolist() == [6, 6]
    ys = [y1]
    for i in range(6, 11):
        yi, state = layer(x[:, i:i + 1], state=state)
        ys.append(yi)
    assert state.position.tolist() == [11, 11]
    close(torch.cat(ys, 1), y)


def test_prefill_in_pieces_and_recurrent_mode():
    layer = make("gla", long_conv=True, long_conv_len=7)
    x = torch.randn(2, 12, D)
    y = layer(x)
    ya, st = layer(x[:, :5], use_cache=True)
    yb, st = layer(x[:, 5:9], state=st)                        # continue with a chunk call
    yc, st = layer(x[:, 9:], state=st)
    close(torch.cat([ya, yb, yc], 1), y)
    layer.mode = "recurrent"
    close(layer(x), y)
    y_full, s_full = layer(x, use_cache=True)
    close(st.mixer, s_full.mixer)
    torch.testing.assert_close(st.conv, s_full.conv)
    torch.testing.assert_close(st.long, s_full.long)


def test_init_state_is_the_empty_history():
    layer = make("mamba2", num_heads=4, long_conv=True, long_conv_len=4)
    x = torch.randn(3, 6, D)
    y0, s0 = layer(x, use_cache=True)
    y1, s1 = layer(x, state=layer.init_state(3))
    close(y1, y0)
    close(s1.mixer, s0.mixer)
    assert s1.batch_size == 3 and s1.detach().position.tolist() == [6, 6, 6]
    sub = s1.index_select(torch.tensor([2, 0]))
    assert sub.mixer.shape[0] == 2 and sub.conv.shape[0] == 2 and sub.long.shape[0] == 2


def test_packed_sequences_do_not_leak_and_decode_per_sequence():
    layer = make("gla", long_conv=True, long_conv_len=6)
    lens = [4, 7, 0, 3]
    seqs = [torch.randn(1, L, D) for L in lens]
    cu = torch.tensor([0, 4, 11, 11, 14])
    packed = torch.cat(seqs, 1)
    y, state = layer(packed, cu_seqlens=cu, use_cache=True)
    assert state.position.tolist() == lens
    for n, s in enumerate(seqs):
        if lens[n]:
            close(y[:, cu[n]:cu[n + 1]], layer(s))
    # decode one more token for every sequence from the packed prefill
    nxt = torch.randn(4, 1, D)
    y_step, _ = layer(nxt, state=state)
    for n, s in enumerate(seqs):
        close(y_step[n:n + 1], layer(torch.cat([s, nxt[n:n + 1]], 1))[:, -1:])


def test_bad_calls_name_the_problem():
    layer = make("gla")
    with pytest.raises(CallError, match="d_model=24"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(CallError, match="B = 1"):
        layer(torch.randn(2, 3, D), cu_seqlens=torch.tensor([0, 3]))
    _, st = layer(torch.randn(2, 3, D), use_cache=True)
    with pytest.raises(CallError, match="holds 2 sequences"):
        layer(torch.randn(3, 1, D), state=st)


def test_layer_without_compile_says_what_to_do(monkeypatch):
    monkeypatch.delattr(mf, "compile", raising=False)
    layer = MixerLayer("gla", D, H)
    x = torch.randn(1, 5, D)
    assert layer.attention_map(x).shape == (1, H, 5, 5)        # no kernels needed
    with pytest.raises(RuntimeError, match="ops="):
        layer(x)


@pytest.mark.parametrize("name", ["gla", "mamba2", "rwkv6"])
def test_generated_kernels_agree_with_the_standin_in_a_layer(name):
    """Same weights, same x: the layer on the generated kernels matches the float64 stand-in, values and grads."""
    if not hasattr(mf, "compile"):
        pytest.fail("mixforge.compile does not exist: nothing to compare the stand-in with")
    real = make(name, num_heads=2, num_groups=2, long_conv=True, long_conv_len=5)
    ref = make(name, True, num_heads=2, num_groups=2, long_conv=True, long_conv_len=5)
    ref.load_state_dict(real.state_dict())
    x = torch.randn(2, 9, D)
    y_real, y_ref = real(x), ref(x)
    close(y_real, y_ref, 1e-4)
    w = torch.randn_like(y_ref)
    (y_real * w).sum().backward()
    (y_ref * w).sum().backward()
    for (n, p), (_, q) in zip(real.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            close(p.grad, q.grad, 1e-3)
