"""torch.compile: a small model of MixerLayers compiles without graph breaks and matches eager.

Two checks. The first wraps the float64 stand-in in a torch.library custom op,
so it tests the layer's own code (projections, convs, reshapes, skip) under
`fullgraph=True` whatever the state of codegen. The second uses the generated
ops (`mixforge.compile`); it fails, rather than skips, until those ops are
registered torch.library custom ops.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mixforge as mf
from mixforge.layer import MixerLayer
from test_layer_standin import ReferenceOps

D, H, T = 16, 2, 8
_REGISTRY: dict[str, "CustomOpStandin"] = {}


@torch.library.custom_op("mixforge_layer_test::ref_chunk", mutates_args=())
def _ref_chunk(xs: list[torch.Tensor], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    ops = _REGISTRY[key]
    y, S = ops.ref.chunk(output_final_state=True, **dict(zip(ops.names, xs)))
    return y.clone(), S.clone()


@_ref_chunk.register_fake
def _(xs, key):
    ops = _REGISTRY[key]
    named = dict(zip(ops.names, xs))
    B, T_, Hh, V = named[ops.value_name].shape
    K = named[ops.key_name].shape[-1]
    return xs[0].new_empty(B, T_, Hh, V), xs[0].new_empty(B, Hh, K, V, dtype=torch.float32)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[0])
    ctx.key = inputs[1]


def _backward(ctx, dy, dS):
    ops = _REGISTRY[ctx.key]
    xs = [x.detach().requires_grad_(True) for x in ctx.saved_tensors]
    with torch.enable_grad():
        y, S = ops.ref.chunk(output_final_state=True, **dict(zip(ops.names, xs)))
        grads = torch.autograd.grad((y, S), xs, (dy, dS), allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)], None


_ref_chunk.register_autograd(_backward, setup_context=_setup)


class CustomOpStandin:
    """The stand-in behind one opaque custom op, as the generated ops are meant to be."""

    def __init__(self, mixer):
        self.mixer = mf.load_mixer(mixer)
        assert not self.mixer.normalize
        self.ref = ReferenceOps(self.mixer)
        self.names = tuple(o.name for o in self.mixer.operands)
        self.value_name = next(o.name for o in self.mixer.inputs if o.dim == "value")
        self.key_name = next(o.name for o in self.mixer.inputs if o.dim == "key")
        self.key = f"{self.mixer.name}-{self.mixer.content_hash}"
        _REGISTRY[self.key] = self

    def chunk(self, *, initial_state=None, output_final_state=False, cu_seqlens=None, scale=None, **tensors):
        assert initial_state is None and cu_seqlens is None and scale is None
        y, S = torch.ops.mixforge_layer_test.ref_chunk([tensors[n] for n in self.names], self.key)
        return y, (S if output_final_state else None)


class Block(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.mixer = layer

    def forward(self, x):
        return x + self.mixer(self.norm(x))


def _model(ops_factory, name="gla"):
    torch.manual_seed(0)
    layers = [MixerLayer(name, D, H, ops=ops_factory(name), long_conv=(i == 1), long_conv_len=4) for i in range(2)]
    return nn.Sequential(*(Block(layer) for layer in layers))


def _compare_compiled(model, x):
    eager_y = model(x)
    eager_y.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.square().mean().backward()
    torch.testing.assert_close(y, eager_y, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in eager_grads:
            torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["mamba2"])   # grouped, scalar and per-value inputs, params, D skip
def test_layer_code_compiles_fullgraph_around_an_opaque_op(name):
    torch._dynamo.reset()
    model = _model(CustomOpStandin, name)
    x = torch.randn(2, T, D)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    _compare_compiled(model, x)


def test_generated_ops_compile_without_graph_breaks():
    """Needs codegen's ops as torch.library custom ops; fails until they exist."""
    if not hasattr(mf, "compile"):
        pytest.fail("mixforge.compile does not exist yet: the generated ops cannot be traced by torch.compile")
    torch._dynamo.reset()
    model = _model(lambda name: mf.compile(mf.load_mixer(name)))
    x = torch.randn(2, T, D)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, [str(r) for r in explanation.break_reasons]
    _compare_compiled(model, x)


def test_lookup_carries_dynamo_constant_mark():
    """codegen.ops marks its config lookup constant without importing torch._dynamo (seconds per process);
    the mark must be the one torch._dynamo's decorator sets, or torch.compile would trace into the lookup."""
    from mixforge.codegen import ops as ops_module

    def f():
        return 0
    torch._dynamo.assume_constant_result(f)
    assert getattr(f, ops_module.DYNAMO_CONSTANT_MARK, None) is True
    assert getattr(ops_module._looked_up, ops_module.DYNAMO_CONSTANT_MARK, None) is True


def test_eager_calls_do_not_import_dynamo():
    import os
    import subprocess
    import sys

    code = ("import sys, torch, mixforge as mf\n"
            "from mixforge.spec.testing import random_inputs\n"
            "m = mf.load_mixer('gla'); ops = mf.compile(m)\n"
            "x = random_inputs(m, B=1, T=9, H=1, K=8, V=8, requires_grad=True)\n"
            "y, _ = ops.chunk(**x); y.sum().backward()\n"
            "print('torch._dynamo' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "False", "an eager fwd+bwd imported torch._dynamo"
