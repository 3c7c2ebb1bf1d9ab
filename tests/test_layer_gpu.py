"""MixerLayer on a CUDA device (skipped, and reported as skipped, without one).

Runs the generated kernels natively: decoding equals one pass in fp32 and bf16
(under autocast, as MQAR trains), packed sequences, and torch.compile with the
default (inductor) backend without graph breaks.
"""
import sys
from pathlib import Path

import pytest
import torch

import mixforge as mf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_layer_standin import ReferenceOps  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
D, H = 128, 2


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", ["gla", "metala", "mamba2", "retnet", "linear_attention"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_then_decode_equals_one_pass_on_gpu(name, dtype):
    torch.manual_seed(0)
    layer = mf.MixerLayer(name, D, H, long_conv=(name == "gla"), long_conv_len=64).cuda()
    x = torch.randn(3, 100, D, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = layer(x)
        y0, st = layer(x[:, :90], use_cache=True)
        ys = [y0]
        for i in range(90, 100):
            yi, st = layer(x[:, i:i + 1], state=st)
            ys.append(yi)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert _rel(torch.cat(ys, 1), y) < tol


def test_packed_sequences_on_gpu():
    torch.manual_seed(0)
    layer = mf.MixerLayer("gla", D, H, long_conv=True, long_conv_len=64).cuda()
    seqs = [torch.randn(1, L, D, device="cuda") for L in (70, 1, 129)]
    cu = torch.tensor([0, 70, 71, 200], device="cuda")
    with torch.no_grad():
        y = layer(torch.cat(seqs, 1), cu_seqlens=cu)
        for n, s in enumerate(seqs):
            assert _rel(y[:, cu[n]:cu[n + 1]], layer(s)) < 1e-4


def test_training_step_compiles_with_inductor_without_graph_breaks():
    torch.manual_seed(0)
    torch._dynamo.reset()
    layer = mf.MixerLayer("gla", D, H).cuda()
    x = torch.randn(2, 128, D, device="cuda", requires_grad=True)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, [str(r) for r in explanation.break_reasons]
    compiled = torch.compile(layer, fullgraph=True)
    y_eager, y = layer(x), compiled(x)
    assert _rel(y, y_eager) < 1e-4
    g_eager = torch.autograd.grad(y_eager.square().sum(), x)[0]
    g = torch.autograd.grad(y.square().sum(), x)[0]
    assert _rel(g, g_eager) < 1e-3


@pytest.mark.parametrize("name", ["gla", "metala", "mamba2", "retnet", "linear_attention"])
def test_layer_gradients_match_the_float64_standin_at_the_mqar_shape(name):
    """The MQAR model's layer (d_model 128, 2 heads of 64, length 256, short conv) on the generated
    CUDA kernels against the same layer on the float64 reference: output and every parameter gradient."""
    torch.manual_seed(0)
    layer = mf.MixerLayer(name, D, H, short_conv=True).cuda()
    ref = mf.MixerLayer(name, D, H, short_conv=True, ops=ReferenceOps(name)).double()
    ref.load_state_dict({k: v.double().cpu() for k, v in layer.state_dict().items()})
    x = torch.randn(4, 256, D, device="cuda")
    dy = torch.randn(4, 256, D, device="cuda")
    y = layer(x)
    (y * dy).sum().backward()
    y64 = ref(x.double().cpu())
    (y64 * dy.double().cpu()).sum().backward()
    assert _rel(y.cpu(), y64) < 1e-4
    grads = {n: p.grad for n, p in layer.named_parameters()}
    for n, p in ref.named_parameters():
        assert grads[n] is not None, n
        assert _rel(grads[n].cpu(), p.grad) < 1e-3, n
