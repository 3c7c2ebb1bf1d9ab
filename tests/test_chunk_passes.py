"""HBM passes around the chunk kernels when the plan has no epilogue (codegen/REQUESTS-chunk.md, B and C).

B: the chunk forward stores o in the inputs' dtype and that tensor is y (no fp32 o, no conversion copy).
C: the output gradient reaches the chunk backward as it is, 16-bit for 16-bit inputs (no fp32 copy).
With an epilogue (gate, norm) o stays fp32, as the epilogue reads it. Interpreter, fp16 (a dtype the
interpreter computes natively) and fp32.
"""
from __future__ import annotations

import pytest
import torch

import mixforge as mf
from mixforge.codegen import chunk as chunk_path
from mixforge.codegen.config import KernelConfig
from mixforge.spec.reference import recurrence
from mixforge.spec.testing import random_inputs

CONFIG = KernelConfig(chunk=16, sub_chunk=8, BV=16)


class Spy:
    """Records what chunk.run_forward returns and what chunk.run_backward receives."""

    def __init__(self, monkeypatch):
        self.o, self.do = [], []
        fwd, bwd = chunk_path.run_forward, chunk_path.run_backward

        def run_forward(c, config):
            out = fwd(c, config)
            self.o.append(out[0])
            return out

        def run_backward(c, config, do, dS_T, dz_T):
            self.do.append(do)
            return bwd(c, config, do, dS_T, dz_T)

        monkeypatch.setattr(chunk_path, "run_forward", run_forward)
        monkeypatch.setattr(chunk_path, "run_backward", run_backward)


def _call(mixer, dtype, spy):
    ops = mf.compile(mixer)
    x = random_inputs(mixer, B=2, T=40, H=2, K=16, V=16, dtype=dtype, seed=5, requires_grad=True)
    y, _ = ops.chunk(config=CONFIG, **x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(y, list(x.values()), dy)
    return x, y, dy, grads


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_no_epilogue_o_is_y_and_dy_is_do(monkeypatch, dtype):
    spy = Spy(monkeypatch)
    mixer = mf.zoo.mamba2                       # no gate, no norm
    assert not mf.compile(mixer).plan.has_epilogue
    x, y, dy, grads = _call(mixer, dtype, spy)
    (o,) = spy.o
    assert o.dtype == dtype and y.dtype == dtype
    assert o.data_ptr() == y.data_ptr()         # y is the kernel's o: no copy
    (do,) = spy.do
    assert do.dtype == dtype                    # dy as it is: no fp32 copy
    assert torch.equal(do, dy)
    # and the results are those of the reference (fp16: fp16 outputs, tf32 dots)
    x64 = {n: t.detach().double().requires_grad_(True) for n, t in x.items()}
    ref = recurrence(mixer, **x64)
    grads64 = torch.autograd.grad(ref.y, list(x64.values()), dy.double())
    tol = 3e-3 if dtype == torch.float16 else 1e-4
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(y, ref.y) < tol
    for n, g, r in zip(x, grads, grads64):
        assert rel(g, r) < tol, n


def test_epilogue_keeps_fp32_o(monkeypatch):
    spy = Spy(monkeypatch)
    mixer = mf.zoo.gla                          # gate and RMS norm read o
    assert mf.compile(mixer).plan.has_epilogue
    _, y, _, _ = _call(mixer, torch.float16, spy)
    (o,) = spy.o
    assert o.dtype == torch.float32 and y.dtype == torch.float16
    (do,) = spy.do
    assert do.dtype == torch.float32            # the epilogue's backward writes do in fp32


@pytest.mark.parametrize("name", ["mamba2", "linear_attention"])
def test_recurrent_backward_reads_a_16bit_do(name):
    """Without an epilogue the recurrent backward gets the fp16 dy as well: its kernels compute in fp32."""
    mixer = mf.zoo.ALL[name]
    ops = mf.compile(mixer)
    x = random_inputs(mixer, B=1, T=12, H=2, K=8, V=8, dtype=torch.float16, seed=6, requires_grad=True)
    y, _ = ops.recurrent(**x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    grads = torch.autograd.grad(y, list(x.values()), dy)
    x64 = {n: t.detach().double().requires_grad_(True) for n, t in x.items()}
    ref = recurrence(mixer, **x64)
    grads64 = torch.autograd.grad(ref.y, list(x64.values()), dy.double())
    for n, g, r in zip(x, grads, grads64):
        assert ((g.double() - r).norm() / r.norm()).item() < 3e-3, n
