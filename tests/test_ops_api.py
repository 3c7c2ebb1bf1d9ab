"""MixerOps: call validation (before any kernel runs), sources, the module cache path, custom ops."""
import os
import warnings

import pytest
import torch

import mixforge as mf
from mixforge.codegen import custom_ops
from mixforge.codegen.config import KernelConfig
from mixforge.spec.errors import CallError
from mixforge.spec.testing import random_inputs

from helpers_codegen import assert_close, zoo_ops as ops_for

class _NoLaunch:
    """Stands in for a kernel: indexing it (a launch) fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("a kernel ran although the call was invalid")


@pytest.fixture
def gla_no_kernels(monkeypatch):
    ops = ops_for("gla")
    for name in ("recurrent_fwd_kernel", "chunk_fwd_kernel", "epilogue_fwd_kernel"):
        if hasattr(ops.module, name):
            monkeypatch.setattr(ops.module, name, _NoLaunch())
    return ops


def _gla(**kw):
    return random_inputs(mf.zoo.gla, B=2, T=5, H=2, K=4, V=3, seed=31, **kw)


@pytest.mark.parametrize("mutate, match", [
    (lambda x: x.pop("a"), "missing input 'a'"),
    (lambda x: x.update(bogus=x["q"]), "unexpected input 'bogus'"),
    (lambda x: x.update(q=x["q"][:, :, :, :3]), r"expected shape \[B, T, H, K\]"),
    (lambda x: x.update(v=x["v"][0]), r"v: expected 4 dims"),
    (lambda x: x.update(q=x["q"].double()), "q: dtype torch.float64 is not supported"),
    (lambda x: x.update(q=x["q"].half()), "differs from the other inputs"),
    (lambda x: x.update(q=x["q"].int()), "q: expected a floating-point tensor"),
    (lambda x: x.update(q=x["q"].tolist()), "q: expected a torch.Tensor"),
])
def test_bad_inputs_name_the_argument(gla_no_kernels, mutate, match):
    x = _gla()
    mutate(x)
    with pytest.raises(CallError, match=match):
        gla_no_kernels.recurrent(**x)
    with pytest.raises(CallError, match=match):
        gla_no_kernels.chunk(**x)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cu_seqlens=torch.tensor([0, 5])), "cu_seqlens: varlen batches need B = 1"),
    (dict(initial_state=torch.zeros(2, 2, 4, 4)), r"initial_state: expected shape \[N, H, K, V\] = \[2, 2, 4, 3\]"),
    (dict(initial_state=torch.zeros(2, 2, 4, 3, dtype=torch.float64)), "initial_state: expected dtype"),
    (dict(output_final_state=1), "output_final_state: expected True or False"),
    (dict(scale=-1.0), "scale: expected a positive"),
    (dict(config={"BV": 16}), "config: expected a mixforge KernelConfig"),
])
def test_bad_options_name_the_argument(gla_no_kernels, kwargs, match):
    with pytest.raises(CallError, match=match):
        gla_no_kernels.recurrent(**_gla(), **kwargs)


def test_varlen_and_state_errors():
    ops = ops_for("rwkv4")
    x = random_inputs(mf.zoo.rwkv4, B=1, T=6, H=2, K=4, V=3, seed=32)
    with pytest.raises(CallError, match="cu_seqlens: must end at T = 6"):
        ops.recurrent(**x, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(CallError, match="cu_seqlens: must be non-decreasing"):
        ops.recurrent(**x, cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32))
    with pytest.raises(CallError, match="normalizes, so its state is a pair"):
        ops.recurrent(**x, initial_state=torch.zeros(1, 2, 4, 3))


def test_group_count_must_divide_heads():
    x = random_inputs(mf.zoo.mamba2, B=1, T=4, H=2, K=4, V=3, seed=33)
    x["B"] = torch.randn(1, 4, 3, 4)
    with pytest.raises(CallError, match="B: the group count 3"):
        ops_for("mamba2").recurrent(**x)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(CallError, match="CUDA device, or TRITON_INTERPRET=1"):
        ops_for("gla").recurrent(**_gla())


def test_sources_and_module_file():
    ops = ops_for("gla")
    whole = ops.source()
    assert whole == ops.source("module") == ops.module_path.read_text()
    assert "def recurrent_fwd_kernel(" in whole and "def chain_kernel(" in whole
    fwd = ops.source("recurrent_fwd")
    assert fwd.startswith("@triton.jit\ndef recurrent_fwd_kernel(") and fwd == ops.source("recurrent_fwd_kernel")
    # gla's decay map, printed into the kernel that evaluates it once per element; the walk reads its factors
    assert "logsigmoid" in ops.source("recurrent_decay") and "logsigmoid" not in fwd and "b_ea" in fwd
    with pytest.raises(KeyError, match="kernels: .*recurrent_bwd"):
        ops.source("nope")
    root = os.environ["MIXFORGE_CACHE_DIR"]
    assert ops.module_path.parent == mf.codegen.cache.kernels_dir()
    assert str(ops.module_path).startswith(root)


def test_compile_accepts_zoo_names_and_shares_the_module():
    a, b = mf.compile("gla"), ops_for("gla")
    assert a.module_path == b.module_path and a.key == b.key


def test_config_lookup_is_asked_per_kernel():
    asked = []

    def lookup(mixer, key):
        asked.append(key)
        return KernelConfig(BV=16) if key.kernel == "recurrent_fwd" else None

    ops = mf.compile(mf.zoo.gla, config_lookup=lookup)
    ops.recurrent(**_gla())
    assert {k.kernel for k in asked} == {"recurrent_fwd", "recurrent_bwd"}
    assert asked[0].dtype == "fp32" and (asked[0].T, asked[0].K, asked[0].V) == (5, 4, 3)


def test_configs_are_chosen_by_the_sizes_of_one_sequence(monkeypatch):
    """The lookup and the heuristic see N sequences of T tokens each: a dense [4, 4096] batch as B = 4,
    T = 4096 (not 1024 tokens a sequence), a varlen batch of 16 sequences packed in T = 32768 as 16 of 2048
    (not one sequence of 32768: its fused forward's programs are 16 times as many)."""
    from mixforge.codegen import ops as ops_mod
    from mixforge.spec.shapes import CallShapes

    asked, sized = [], []
    real = ops_mod.heuristic_config
    monkeypatch.setattr(ops_mod, "heuristic_config", lambda *a, **k: sized.append(k) or real(*a, **k))
    ops = mf.compile(mf.zoo.gla, config_lookup=lambda mixer, key: asked.append(key))
    for B, T, N, varlen in ((4, 4096, 4, False), (1, 32768, 16, True)):
        ops.config("chunk_fwd", CallShapes(B, T, 16, 128, 128, N, (), torch.bfloat16, torch.device("cpu"), varlen))
    assert [(k.B, k.T) for k in asked] == [(4, 4096), (16, 2048)]
    assert [(k["NH"], k["T"]) for k in sized] == [(64, 4096), (256, 2048)]


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementation, autograd registration: torch's own consistency checks."""
    ops = ops_for("rwkv4")
    x = random_inputs(mf.zoo.rwkv4, B=1, T=3, H=1, K=2, V=2, seed=34, requires_grad=True)
    xs = [x[n] for n in ops.plan.operand_names]
    cfg = custom_ops.config_key(KernelConfig(BV=16))
    args = (ops.key, "recurrent", cfg, cfg, xs, None, None, None, None, 1.0, True)
    torch.library.opcheck(torch.ops.mixforge.mixer_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("name", ["gla", "rwkv4"])
def test_torch_compile_fullgraph(name):
    """A function calling the ops traces into one graph (backend aot_eager) and matches eager, gradients too."""
    mixer, ops = mf.zoo.ALL[name], ops_for(name)
    x = random_inputs(mixer, B=1, T=4, H=2, K=4, V=3, seed=35)

    def f(**kw):
        y, S = ops.recurrent(**kw, output_final_state=True)
        S = S[0] if mixer.normalize else S
        return y.square().sum() + S.sum()

    torch._dynamo.reset()
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(**leaves)
    loss.backward()
    eager = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    loss_eager = f(**eager)
    loss_eager.backward()
    assert_close(loss, loss_eager, "loss")
    for k in x:
        assert_close(leaves[k].grad, eager[k].grad, f"d{k}")


def test_gradients_with_any_strides():
    """The gradient of a sum is an expanded (stride 0) tensor: the kernels get contiguous copies."""
    mixer, ops = mf.zoo.rwkv4, ops_for("rwkv4")
    x = random_inputs(mixer, B=1, T=4, H=2, K=3, V=3, seed=36, requires_grad=True)
    y, (S, z) = ops.recurrent(**x, output_final_state=True)
    (y.sum() + S.sum() + z.sum()).backward()
    x64 = {k: v.detach().double().requires_grad_(True) for k, v in x.items()}
    y_ref, (S_ref, z_ref) = mf.reference(mixer, **x64, output_final_state=True)
    (y_ref.sum() + S_ref.sum() + z_ref.sum()).backward()
    for k in x:
        assert_close(x[k].grad, x64[k].grad, f"d{k}")


def test_chunk_falls_back_to_the_recurrent_path_with_one_warning(monkeypatch):
    from mixforge.codegen import ops as ops_module

    monkeypatch.setattr(ops_module, "_chunk_available", lambda: False)
    monkeypatch.setattr(ops_module, "_warned_no_chunk", False)
    ops, x = ops_for("gla"), _gla()
    with pytest.warns(UserWarning, match="runs the recurrent kernels"):
        y, _ = ops.chunk(**x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y2, _ = ops.chunk(**x)
    torch.testing.assert_close(y, ops.recurrent(**x)[0])
    torch.testing.assert_close(y, y2)


def _grads_by(run, x: dict, S0: torch.Tensor, dy: torch.Tensor) -> tuple:
    """y and the gradients of <y, dy> in every input and S0, for a function (x, S0) -> (y, S_T)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in x.items()}
    S = S0.detach().clone().requires_grad_(True)
    y, _ = run(leaves, S)
    y.backward(dy)
    return (y.detach(), S.grad, *(leaves[k].grad for k in x))


def test_eager_calls_run_the_custom_ops_bodies():
    """In eager mode a call runs mixer_fwd's and mixer_bwd's bodies through an autograd.Function, not the
    ops' dispatch (whose Python layers cost the host more than the kernels' launches): bitwise the same
    outputs and gradients as the ops themselves, an unused final state's gradient arriving as None (not as
    zeros to read), and no second derivative that would be silently wrong."""
    from mixforge.codegen import chunk as chunk_path

    mixer, ops = mf.zoo.gla, ops_for("gla")
    x = random_inputs(mixer, B=2, T=21, H=2, K=8, V=4, seed=37)
    S0 = torch.randn(2, 2, 8, 4)
    dy = torch.randn(2, 21, 2, 4)
    cfg = custom_ops.config_key(KernelConfig(chunk=16, sub_chunk=16, BV=16))

    def by_op(leaves, S):
        y, _, S_T, _ = torch.ops.mixforge.mixer_fwd(ops.key, "chunk", cfg, cfg, [leaves[n] for n in
                                                    ops.plan.operand_names], S, None, None, None, 0.5, True)
        return y, S_T

    def eager(leaves, S):
        y, _, S_T, _ = custom_ops.call(ops.key, "chunk", cfg, cfg, [leaves[n] for n in ops.plan.operand_names], S,
                                       None, None, None, 0.5, True)
        assert type(y.grad_fn).__name__ == "_EagerCallBackward"
        return y, S_T

    seen = []
    real = chunk_path.run_backward

    def spy(c, config, do, dS_T, dz_T):
        seen.append(dS_T)
        return real(c, config, do, dS_T, dz_T)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunk_path, "run_backward", spy)
        want, got = _grads_by(by_op, x, S0, dy), _grads_by(eager, x, S0, dy)
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    assert seen[-1] is None, "an unused final state's gradient reached the backward as a tensor"

    with torch.no_grad():
        y, *_ = custom_ops.call(ops.key, "chunk", cfg, cfg, [x[n] for n in ops.plan.operand_names], S0, None,
                                None, None, 0.5, False)
    assert y.grad_fn is None and torch.equal(y, got[0])

    q = x["q"].detach().clone().requires_grad_(True)
    y, _ = ops.chunk(**dict(x, q=q), config=KernelConfig(chunk=16, sub_chunk=16, BV=16))
    (dq,) = torch.autograd.grad(y.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dq.sum().backward()
