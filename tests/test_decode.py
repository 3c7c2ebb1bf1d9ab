"""The decoder (ops.decoder): static buffers, the state in place, the same results as ops.step and one pass.

On CPU (Triton's interpreter) a decoder launches the kernels on its buffers; the CUDA-graph capture
and replay run on a GPU only (benchmarks/decode_bench.py checks them against ops.step there).
"""
import pytest
import torch

import mixforge as mf
from mixforge.spec.errors import CallError
from mixforge.spec.testing import random_inputs

from helpers_codegen import assert_close, prefill_state, state_parts, step_token, zoo_ops as ops_for

def split(mixer, x, t):
    """(all of token t's tensors, its per-token inputs only)."""
    full = step_token(mixer, x, t)
    names = {o.name for o in mixer.inputs}
    return full, {k: v for k, v in full.items() if k in names}



@pytest.mark.parametrize("name", ["gla", "mamba2", "cosformer", "rwkv4", "retnet"])
def test_prefill_then_decoder_steps_equal_one_pass(name):
    mixer, ops = mf.zoo.ALL[name], ops_for(name)
    T, prefill = 8, 5
    x = random_inputs(mixer, B=2, T=T, H=2, K=5, V=6, seed=41)
    y_all, S_all = ops.recurrent(**x, output_final_state=True)
    state = prefill_state(ops, mixer, x, prefill)
    dec = ops.decoder(state=state, position=prefill, **split(mixer, x, 0)[0])
    buffers = [s.data_ptr() for s in state_parts(dec.state)]
    for t in range(prefill, T):
        y = dec(**split(mixer, x, t)[1])
        assert y.shape == y_all[:, t].shape and y.dtype == y_all.dtype
        assert_close(y, y_all[:, t], f"y[{t}]")
    assert [s.data_ptr() for s in state_parts(dec.state)] == buffers   # updated in place
    for got, want in zip(state_parts(dec.state), state_parts(S_all)):
        assert_close(got, want, "state")
    if ops.plan.uses_t:
        assert dec.position.tolist() == [T, T]
    else:
        assert dec.position is None
    # the decoder copied the state it was given: the prefill's state is as it was
    again = prefill_state(ops, mixer, x, prefill)
    for a, b in zip(state_parts(state), state_parts(again)):
        assert torch.equal(a, b)


def test_decoder_matches_plain_steps_in_bf16_and_keeps_its_parameters():
    mixer, ops = mf.zoo.mamba2, ops_for("mamba2")
    x = random_inputs(mixer, B=3, T=4, H=4, K=8, V=8, G=2, dtype=torch.bfloat16, seed=42)
    dec = ops.decoder(**split(mixer, x, 0)[0])          # parameters given once, here
    state = None
    for t in range(4):
        full, inputs = split(mixer, x, t)
        y, state = ops.step(state=state, **full)
        y_dec = dec(**inputs)
        assert y_dec.dtype == torch.bfloat16
        assert torch.equal(y_dec, y), f"y[{t}]"
    assert torch.equal(dec.state, state)
    # parameters given in a call replace the kept ones
    full, inputs = split(mixer, x, 0)
    new = {"A_log": full["A_log"] + 1.0, "dt_bias": full["dt_bias"] - 0.5}
    y, state = ops.step(state=state, **{**full, **new})
    assert torch.equal(dec(**inputs, **new), y)
    assert torch.equal(dec.params["A_log"], new["A_log"])


@pytest.mark.parametrize("by_cat", [False, True])
def test_decoder_copy_paths_match_plain_steps(monkeypatch, by_cat):
    """Both ways a token is copied in (foreach for small tokens, one cat from FOREACH_CHUNK elements on),
    with non-contiguous token slices and parameters given in a call."""
    from mixforge.codegen import decode as decode_module

    monkeypatch.setattr(decode_module, "FOREACH_CHUNK", 1 if by_cat else 1 << 40)
    mixer, ops = mf.zoo.mamba2, ops_for("mamba2")
    x = random_inputs(mixer, B=2, T=3, H=4, K=8, V=8, G=2, dtype=torch.bfloat16, seed=44)
    dec = ops.decoder(**split(mixer, x, 0)[0])
    assert dec._copy_by_cat is by_cat
    state = None
    for t in range(3):
        full, inputs = split(mixer, x, t)
        new = {"A_log": full["A_log"] + 0.25 * t}
        y, state = ops.step(state=state, **{**full, **new})
        assert torch.equal(dec(**inputs, **new), y), f"y[{t}]"
    assert torch.equal(dec.state, state)
    for n, v in split(mixer, x, 2)[1].items():
        assert torch.equal(dec.inputs[n], v)


def test_reset_load_state_and_run():
    mixer, ops = mf.zoo.gla, ops_for("gla")
    x = random_inputs(mixer, B=2, T=3, H=2, K=4, V=4, seed=43)
    dec = ops.decoder(**split(mixer, x, 0)[0])
    y0 = dec(**split(mixer, x, 0)[1]).clone()
    dec(**split(mixer, x, 1)[1])
    dec.reset()
    assert not dec.state.any()
    assert torch.equal(dec(**split(mixer, x, 0)[1]), y0)            # from zeros again
    y_step, S_step = ops.step(**split(mixer, x, 0)[0])
    saved = dec.state.clone()
    dec(**split(mixer, x, 2)[1])
    dec.load_state(saved)
    assert torch.equal(dec.state, S_step)
    # run(): the token written into the buffers by the caller
    for n, v in split(mixer, x, 1)[1].items():
        dec.inputs[n].copy_(v)
    y_run = dec.run().clone()
    want, _ = ops.step(state=S_step, **split(mixer, x, 1)[0])
    assert torch.equal(y_run, want)


def test_varlen_prefill_then_decoder_positions_per_sequence():
    """Sequences of different lengths: a packed prefill, then one decoder over the sequences, each at its
    own position (cosformer's maps use t)."""
    mixer, ops = mf.zoo.cosformer, ops_for("cosformer")
    lengths = [3, 5]
    seqs = [random_inputs(mixer, B=1, T=n + 2, H=2, K=4, V=3, seed=44 + i) for i, n in enumerate(lengths)]
    params = {k: seqs[0][k] for k in ("freq", "phase")}
    names = {o.name for o in mixer.inputs}
    packed = {k: torch.cat([s[k][:, :n] for s, n in zip(seqs, lengths)], 1) for k in names}
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    _, state = ops.recurrent(**packed, **params, cu_seqlens=cu, output_final_state=True)
    first = {k: torch.cat([s[k][:, n] for s, n in zip(seqs, lengths)]) for k in names}
    dec = ops.decoder(state=state, position=torch.tensor(lengths), **first, **params)
    for step in range(2):
        tok = {k: torch.cat([s[k][:, n + step] for s, n in zip(seqs, lengths)]) for k in names}
        y = dec(**tok)
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            y_all, _ = ops.recurrent(**{k: s[k][:, :n + step + 1] for k in names}, **params)
            assert_close(y[i], y_all[0, -1], f"sequence {i}, step {step}")
    assert dec.position.tolist() == [5, 7]
    # a position given in a call overrides the counter for this token
    tok = {k: torch.cat([s[k][:, 0] for s in seqs]) for k in names}
    dec.reset()
    y = dec(position=0, **tok)
    want, _ = ops.step(position=0, **tok, **params)
    assert torch.equal(y, want) and dec.position.tolist() == [1, 1]


def test_decoder_errors_name_the_argument():
    mixer, ops = mf.zoo.cosformer, ops_for("cosformer")
    x = random_inputs(mixer, B=2, T=1, H=1, K=4, V=3, seed=45)
    full, inputs = split(mixer, x, 0)
    # construction: ops.step's checks and messages
    with pytest.raises(CallError, match="q: a step takes one token"):
        ops.decoder(position=0, **dict(full, q=x["q"]))
    with pytest.raises(CallError, match=r"state\[0\]"):
        ops.decoder(state=(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4)), position=0, **full)
    with pytest.raises(CallError, match="position"):     # a state without its position
        ops.decoder(state=(torch.zeros(2, 1, 4, 3), torch.zeros(2, 1, 4)), **full)
    with pytest.raises(CallError, match="graph: CUDA graphs need a CUDA device"):
        ops.decoder(graph=True, **full)
    dec = ops.decoder(**full)
    assert dec.position.tolist() == [0, 0]                 # no state: the start of the sequences
    with pytest.raises(CallError, match=r"q: expected shape \[B, H, K\] = \[2, 1, 4\] \(this decoder's\), "
                                        r"got \[2, 1, 1, 4\]"):
        dec(**dict(inputs, q=x["q"]))
    with pytest.raises(CallError, match=r"v: expected shape \[B, H, V\] = \[2, 1, 3\]"):
        dec(**dict(inputs, v=inputs["v"][:1]))
    with pytest.raises(CallError, match="k: expected dtype torch.float32"):
        dec(**dict(inputs, k=inputs["k"].half()))
    with pytest.raises(CallError, match="k: expected device cpu"):
        dec(**dict(inputs, k=torch.empty_like(inputs["k"], device="meta")))
    with pytest.raises(CallError, match="missing input 'k'"):
        dec(**{n: v for n, v in inputs.items() if n != "k"})
    with pytest.raises(CallError, match="unexpected input 'bogus'"):
        dec(**inputs, bogus=inputs["q"])
    with pytest.raises(CallError, match="q: expected a torch.Tensor"):
        dec(**dict(inputs, q=inputs["q"].tolist()))
    with pytest.raises(CallError, match="position: expected an integer tensor of shape"):
        dec(position=torch.tensor([1, 2, 3]), **inputs)
    with pytest.raises(CallError, match=r"state\[1\] \(z\): expected shape"):
        dec.load_state((torch.zeros(2, 1, 4, 3), torch.zeros(2, 2, 4)), position=0)
    with pytest.raises(CallError, match="position"):
        dec.load_state((torch.zeros(2, 1, 4, 3), torch.zeros(2, 1, 4)))
    before = [s.clone() for s in dec.state]
    assert all(torch.equal(a, b) for a, b in zip(dec.state, before))   # nothing was copied by failed calls


def test_decoder_built_under_inference_mode_works_outside_it():
    mixer, ops = mf.zoo.cosformer, ops_for("cosformer")
    full, inputs = split(mixer, random_inputs(mixer, B=2, T=1, H=1, K=4, V=3, seed=48), 0)
    with torch.inference_mode():
        dec = ops.decoder(**full)
        y_in = dec(**inputs).clone()
    dec.reset()
    assert torch.equal(dec(**inputs), y_in)
    dec.load_state(tuple(s.clone() for s in dec.state), position=3)
    assert dec.position.tolist() == [3, 3]


def test_decoder_takes_tokens_that_track_gradients():
    """A token straight out of a projection that requires grad: copied in without recording the copy
    (the buffers stay plain tensors, the step's y the same as from a detached token)."""
    mixer, ops = mf.zoo.cosformer, ops_for("cosformer")
    full, inputs = split(mixer, random_inputs(mixer, B=2, T=1, H=1, K=4, V=3, seed=49), 0)
    dec = ops.decoder(**full)
    y = dec(**{n: x.clone().requires_grad_(True) for n, x in inputs.items()}).clone()
    assert not any(b.requires_grad for b in dec.inputs.values()) and not y.requires_grad
    dec.reset()
    assert torch.equal(dec(**inputs), y)
