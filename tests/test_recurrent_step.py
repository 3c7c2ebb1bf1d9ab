"""Decoding: a prefill followed by single-token steps gives the outputs and state of one pass."""
import pytest
import torch

import mixforge as mf
from mixforge.codegen import ops as ops_module
from mixforge.spec.errors import CallError
from mixforge.spec.testing import random_inputs

from helpers_codegen import assert_close, prefill_state, state_parts, step_token as token, zoo_ops as ops_for

@pytest.mark.parametrize("name", ["gla", "rwkv6", "rwkv4", "cosformer", "mamba2", "retnet"])
def test_prefill_then_steps_equals_one_pass(name):
    mixer, ops = mf.zoo.ALL[name], ops_for(name)
    T, prefill = 9, 5
    x = random_inputs(mixer, B=2, T=T, H=2, K=5, V=6, seed=21)
    y_all, S_all = ops.recurrent(**x, output_final_state=True)
    state = prefill_state(ops, mixer, x, prefill)
    for t in range(prefill, T):
        y_t, state = ops.step(state=state, position=t, **token(mixer, x, t))
        assert y_t.shape == y_all[:, t].shape and y_t.dtype == y_all.dtype
        assert_close(y_t, y_all[:, t], f"y[{t}]")
    for got, want in zip(state_parts(state), state_parts(S_all)):
        assert_close(got, want, "state")


def test_step_from_no_state_is_the_first_token():
    mixer, ops = mf.zoo.gla, ops_for("gla")
    x = random_inputs(mixer, B=2, T=1, H=2, K=4, V=4, seed=22)
    y, S = ops.recurrent(**x, output_final_state=True)
    y_t, S_t = ops.step(**token(mixer, x, 0))
    assert_close(y_t, y[:, 0], "y")
    assert_close(S_t, S, "state")


def test_step_leaves_the_given_state_alone_and_takes_tensor_positions():
    mixer, ops = mf.zoo.cosformer, ops_for("cosformer")
    x = random_inputs(mixer, B=2, T=4, H=1, K=4, V=3, seed=23)
    _, state = ops.recurrent(**x, output_final_state=True)
    before = tuple(s.clone() for s in state)
    nxt = random_inputs(mixer, B=2, T=1, H=1, K=4, V=3, seed=24)
    nxt.update({k: x[k] for k in ("freq", "phase")})
    y1, _ = ops.step(state=state, position=4, **token(mixer, nxt, 0))
    y2, _ = ops.step(state=state, position=torch.tensor([4, 4]), **token(mixer, nxt, 0))
    assert all(torch.equal(a, b) for a, b in zip(state, before))
    torch.testing.assert_close(y1, y2)


def test_step_errors_name_the_argument():
    mixer, ops = mf.zoo.cosformer, ops_for("cosformer")
    x = token(mixer, random_inputs(mixer, B=2, T=1, H=1, K=4, V=3, seed=25), 0)
    with pytest.raises(CallError, match="position"):
        ops.step(**x)
    with pytest.raises(CallError, match="position"):
        ops.step(position=torch.tensor([1, 2, 3]), **x)
    with pytest.raises(CallError, match=r"state\[0\]"):
        ops.step(state=(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4)), position=0, **x)
    bad = dict(x, q=x["q"][:, None])
    with pytest.raises(CallError, match="q: a step takes one token"):
        ops.step(position=0, **bad)


def test_step_validates_a_layout_once_and_still_rejects_bad_calls(monkeypatch):
    mixer, ops = mf.zoo.gla, mf.compile(mf.zoo.gla)
    x = random_inputs(mixer, B=2, T=1, H=2, K=4, V=3, seed=46)
    full = token(mixer, x, 0)
    calls = []
    real = ops_module.resolve_call
    monkeypatch.setattr(ops_module, "resolve_call", lambda *a, **k: calls.append(1) or real(*a, **k))
    y1, S = ops.step(**full)
    y2, S2 = ops.step(state=S, **full)
    y3, _ = ops.step(state=S, **full)
    assert len(calls) == 2                  # no state, then with a state: two layouts, each validated once
    assert torch.equal(y2, y3)
    # bad calls after good ones: the messages of a MixerOps that has cached nothing
    fresh = mf.compile(mf.zoo.gla)
    bad = [dict(full, q=full["q"][:, :, :3]), dict(full, v=full["v"].double()), dict(full, state=S[:, :, :, :2]),
           dict(full, state=S, scale=True), dict(full, state=S, config={"BV": 16}), dict(full, state=S, bogus=S)]
    for kw in bad:
        with pytest.raises(CallError) as cached:
            ops.step(**kw)
        with pytest.raises(CallError) as first:
            fresh.step(**kw)
        assert str(cached.value) == str(first.value)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(CallError, match="CUDA device, or TRITON_INTERPRET=1"):
        ops.step(state=S, **full)


def test_step_without_epilogue_returns_the_inputs_dtype():
    mixer, ops = mf.zoo.mamba2, ops_for("mamba2")
    x = random_inputs(mixer, B=2, T=1, H=2, K=8, V=8, dtype=torch.bfloat16, seed=47)
    y, S = ops.step(**token(mixer, x, 0))
    y_all, S_all = ops.recurrent(**x, output_final_state=True)
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32
    # the interpreter rounds fp32 -> bf16 by truncation in the kernel's store (a GPU rounds to nearest even)
    torch.testing.assert_close(y.float(), y_all[:, 0].float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(S, S_all)
