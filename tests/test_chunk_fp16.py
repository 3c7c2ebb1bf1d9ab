"""fp16 inputs under strong decays: nothing the output dtype can hold may underflow inside the kernels.

On the H100 the chunked backward with fp16 dot operands lost the initial-state gradient entirely
(relative error 1.0) at log-decays of -20 per token: exp(B)-scaled operands fell below fp16's range.
The interpreter rounds to fp16 the same way, so this is checked here.
"""
import dataclasses

import pytest
import torch

import mixforge as mf
from mixforge.spec.reference import recurrence
from mixforge.spec.testing import random_inputs


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def test_fp16_strong_decay_gradients_do_not_underflow():
    m = mf.zoo.gla
    ops = mf.compile(m)
    x = random_inputs(m, B=1, T=40, H=1, K=16, V=16, dtype=torch.float16, seed=3, decay="strong")
    x = {k: v.requires_grad_(True) for k, v in x.items()}
    S0 = (torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.1).requires_grad_(True)
    y, st = ops.chunk(initial_state=S0, output_final_state=True, **x)
    dy = torch.randn_like(y)
    ds = torch.randn_like(st)
    grads = torch.autograd.grad((y.float() * dy.float()).sum() + (st * ds).sum(), list(x.values()) + [S0])

    x64 = {k: v.detach().double().requires_grad_(True) for k, v in x.items()}
    S64 = S0.detach().double().requires_grad_(True)
    r = recurrence(m, initial_state=S64, output_final_state=True, **x64)
    ref = torch.autograd.grad((r.y * dy.double()).sum() + (r.final_state * ds.double()).sum(),
                              list(x64.values()) + [S64])
    got = dict(zip(list(x) + ["S0"], grads))
    want = dict(zip(list(x) + ["S0"], ref))
    assert _rel(y, r.y) < 5e-3
    assert _rel(got["S0"], want["S0"]) < 1e-4          # fp32 output: must not be lost
    for name in ("q", "k", "v", "g"):
        assert _rel(got[name], want[name]) < 5e-3, name
    # the decay gradient is ~1e-9 here, below fp16's range: the best an fp16 tensor can hold is the
    # reference rounded to fp16
    held = want["a"].to(torch.float16).double()
    assert (got["a"].double() - held).abs().max().item() < 1e-7


@pytest.mark.parametrize("name", ["gla", "rwkv6", "mamba2"])
def test_passthrough_gradients_are_the_fp32_ones_rounded_once(name, monkeypatch):
    """A feature that is an input as-is (gla's q, k, v; rwkv6's r, k, v with its exclusive bonus;
    mamba2's x) has its gradient stored by the chunked backward in the input's dtype, with no chain
    kernel pass: bit for bit the fp32 gradient rounded to fp16 once."""
    from mixforge.codegen import chunk as chunk_path

    m = mf.zoo.ALL[name]
    ops = mf.compile(m)
    direct = set(ops.plan.passthrough.values())
    assert direct and not direct & set(ops.module.CHAIN_WRITES)
    x = random_inputs(m, B=2, T=37, H=2, K=16, V=24, dtype=torch.float16, seed=5)

    def grads():
        xs = {k: v.detach().clone().requires_grad_(True) for k, v in x.items()}
        y, _ = ops.chunk(**xs)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        return dict(zip(xs, torch.autograd.grad(y, list(xs.values()), dy)))

    got = grads()
    from_ctx = chunk_path.ChunkCall.from_ctx.__func__
    monkeypatch.setattr(chunk_path.ChunkCall, "from_ctx", classmethod(
        lambda cls, ctx: dataclasses.replace(from_ctx(cls, ctx), dfeature_dtypes=(torch.float32,) * 3)))
    via_fp32 = grads()
    for n in direct:
        assert got[n].dtype == torch.float16 and torch.equal(got[n], via_fp32[n]), n
    for n in set(x) - direct:
        assert torch.equal(got[n], via_fp32[n]), n
