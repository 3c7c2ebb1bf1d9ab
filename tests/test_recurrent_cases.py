"""The recurrent path on the cases that break kernels: lengths, varlen, strong decay, odd sizes, dtypes."""
import pytest
import torch

import mixforge as mf
from mixforge.codegen.config import KernelConfig
from mixforge.spec.testing import random_inputs

from helpers_codegen import assert_close, check_call, random_state, zoo_ops as ops_for

def key_dim(mixer, x):
    return next((x[o.name].shape[-1] for o in mixer.operands if o.dim == "key"), 1)


@pytest.mark.parametrize("name", ["gla", "rwkv6", "rwkv4", "mamba2"])
def test_single_token(name):
    mixer, ops = mf.zoo.ALL[name], ops_for(name)
    x = random_inputs(mixer, B=2, T=1, H=2, K=6, V=5, seed=1)
    check_call(mixer, ops.recurrent, x, initial_state=random_state(mixer, 2, 2, key_dim(mixer, x), 5))


def test_long_sequence_without_initial_state():
    mixer = mf.zoo.gla
    x = random_inputs(mixer, B=1, T=40, H=1, K=7, V=9, seed=2)
    check_call(mixer, ops_for("gla").recurrent, x)


@pytest.mark.parametrize("name", ["gla", "mamba2", "rwkv4", "cosformer"])
def test_varlen_with_an_empty_sequence(name):
    """cu_seqlens with a zero-length sequence: its final state is its initial state; t restarts per sequence."""
    mixer, ops = mf.zoo.ALL[name], ops_for(name)
    cu = torch.tensor([0, 5, 5, 12, 19], dtype=torch.int32)
    x = random_inputs(mixer, B=1, T=19, H=2, K=6, V=5, seed=3)
    S0 = random_state(mixer, 4, 2, key_dim(mixer, x), 5, seed=4)
    _, final = check_call(mixer, ops.recurrent, x, initial_state=S0, cu_seqlens=cu)
    S_T, S_0 = (final[0], S0[0]) if mixer.normalize else (final, S0)
    torch.testing.assert_close(S_T[1], S_0[1])


def test_varlen_int64_cu_seqlens_and_no_initial_state():
    mixer = mf.zoo.rwkv6
    x = random_inputs(mixer, B=1, T=11, H=1, K=4, V=4, seed=5)
    check_call(mixer, ops_for("rwkv6").recurrent, x, cu_seqlens=torch.tensor([0, 0, 6, 11]))


@pytest.mark.parametrize("name", ["gla", "hgrn2", "rwkv6", "mamba", "mamba2", "metala", "griffin", "rfa",
                                  "transnormer", "rwkv4"])
def test_strong_decay(name):
    """Log-decays down to about -20 per token: nothing overflows, gradients stay accurate.

    A normalized mixer then outputs about v (num and den both ~ fq . fk_t): its q and k gradients
    are ~0 up to cancellation, so small gradients are compared at 1% of the largest one's scale.
    """
    mixer, ops = mf.zoo.ALL[name], ops_for(name)
    x = random_inputs(mixer, B=1, T=12, H=2, K=5, V=6, seed=6, decay="strong")
    check_call(mixer, ops.recurrent, x, initial_state=random_state(mixer, 1, 2, key_dim(mixer, x), 6),
               floor=1e-2 if mixer.normalize else 1e-3)


def test_several_value_blocks():
    """V split over value blocks: the backward's per-block sums over V (dq, dk, decay, bonus, dz) add up."""
    for name in ("metala", "rwkv4"):
        mixer = mf.zoo.ALL[name]
        x = random_inputs(mixer, B=1, T=6, H=2, K=5, V=20, seed=7)
        call = lambda **kw: ops_for(name).recurrent(**kw, config=KernelConfig(BV=16))  # noqa: E731
        check_call(mixer, call, x, initial_state=random_state(mixer, 1, 2, key_dim(mixer, x), 20))


def test_large_key_and_value_dims():
    """K, V up to 256 and not powers of two."""
    mixer = mf.zoo.gla
    x = random_inputs(mixer, B=1, T=3, H=1, K=200, V=130, seed=8)
    check_call(mixer, ops_for("gla").recurrent, x, initial_state=random_state(mixer, 1, 1, 200, 130))


def test_explicit_scale():
    mixer = mf.zoo.gla
    x = random_inputs(mixer, B=1, T=5, H=2, K=4, V=4, seed=9)
    check_call(mixer, ops_for("gla").recurrent, x, scale=0.3)


def test_gradient_through_the_final_state_only():
    mixer, ops = mf.zoo.mamba2, ops_for("mamba2")
    x = random_inputs(mixer, B=1, T=7, H=2, K=4, V=3, seed=10, requires_grad=True)
    S0 = torch.randn(1, 2, 4, 3, requires_grad=True)
    _, S = ops.recurrent(**x, initial_state=S0, output_final_state=True)
    S.square().sum().backward()
    x64 = {k: v.detach().double().requires_grad_(True) for k, v in x.items()}
    S064 = S0.detach().double().requires_grad_(True)
    _, S_ref = mf.reference(mixer, **x64, initial_state=S064, output_final_state=True)
    S_ref.square().sum().backward()
    assert torch.equal(x["C"].grad, torch.zeros_like(x["C"]))   # C only reads the state
    for k in x:
        if k != "C":
            assert_close(x[k].grad, x64[k].grad, f"d{k}")
    assert_close(S0.grad, S064.grad, "dS0")


def test_without_final_state():
    mixer = mf.zoo.hgrn2
    x = random_inputs(mixer, B=2, T=6, H=1, K=4, V=4, seed=11)
    y, final = check_call(mixer, ops_for("hgrn2").recurrent, x, output_final_state=False)
    assert final is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """fp16/bf16 in, the same dtype out (fp32 state and accumulation inside)."""
    mixer = mf.zoo.gla
    x = random_inputs(mixer, B=1, T=8, H=2, K=8, V=8, seed=12, dtype=dtype)
    check_call(mixer, ops_for("gla").recurrent, x, tol=2e-2 if dtype == torch.bfloat16 else 3e-3)


def test_non_contiguous_inputs():
    mixer = mf.zoo.gla
    x = random_inputs(mixer, B=2, T=6, H=2, K=4, V=4, seed=13)
    strided = {k: (v.transpose(0, 1).contiguous().transpose(0, 1) if v.dim() == 4 else v) for k, v in x.items()}
    assert not strided["q"].is_contiguous()
    check_call(mixer, ops_for("gla").recurrent, strided)


def test_grouped_inputs_with_several_groups():
    mixer = mf.zoo.mamba2
    x = random_inputs(mixer, B=1, T=6, H=2, K=4, V=3, G=2, seed=14)
    check_call(mixer, ops_for("mamba2").recurrent, x, initial_state=random_state(mixer, 1, 2, 4, 3))


def test_empty_sequence_batch():
    """T = 0: empty outputs, and the final state is the initial one (gradients flow to it)."""
    mixer, ops = mf.zoo.rwkv4, ops_for("rwkv4")
    x = random_inputs(mixer, B=2, T=0, H=2, K=4, V=3, seed=15)
    S0 = (torch.randn(2, 2, 4, 3, requires_grad=True), torch.rand(2, 2, 4, requires_grad=True))
    y, (S, z) = ops.recurrent(**x, initial_state=S0, output_final_state=True)
    assert y.shape == (2, 0, 2, 3)
    torch.testing.assert_close(S, S0[0])
    (S.sum() + z.sum()).backward()
    assert torch.equal(S0[0].grad, torch.ones_like(S0[0]))


def test_parameters_inside_the_bonus_term_and_a_position_dependent_decay():
    """Bonus-term parameters get do * dterm/dp from the chain kernel (s recomputed there); t in the decay."""
    from mixforge import Bonus, Input, Mixer, Param, s, t, value
    from mixforge.functions import exp, logsigmoid, sigmoid

    q, k, a, v = Input("q"), Input("k"), Input("a"), Input("v", dim="value")
    pb, pbh = Param("pb", dim="value"), Param("pbh", dim=None)
    mixer = Mixer("bonus_params", fq=q, fk=k, fv=v, fa=logsigmoid(a) / (1 + t), inclusive=False,
                  bonus=Bonus(weight=exp(Param("u")), term=sigmoid(s) * value * exp(pb) + pbh * value))
    x = random_inputs(mixer, B=1, T=7, H=2, K=5, V=4, seed=16)
    check_call(mixer, mf.compile(mixer).recurrent, x, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32))
