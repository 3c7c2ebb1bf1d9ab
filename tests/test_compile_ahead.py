"""Compiling a call's kernels ahead of it (codegen/launch.py, custom_ops.compile_first).

On CPU there is no compile step, so the GPU's Triton compile is replaced by a recorder: the tests check
that a dry run launches nothing, that it records exactly the launches (kernel, grid, arguments) of the
real call that follows, that kernels compile in parallel threads, that failures are left to the real call,
and that the real call's results are untouched by the dry run before it.
"""
from __future__ import annotations

import threading

import pytest
import torch

import mixforge as mf
from mixforge.codegen import custom_ops
from mixforge.codegen import launch as launch_mod
from mixforge.codegen.config import KernelConfig
from mixforge.codegen.launch import Launch, compile_ahead, compile_launches, launch, recording
from mixforge.spec.testing import random_inputs


class FakeKernel:
    """Stands in for a JITFunction: `kernel[grid](...)` logs the launch."""

    def __init__(self, name, log=None):
        self.__name__, self.log = name, log if log is not None else []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.__name__, grid, args, kwargs))


def test_launch_runs_outside_recording_and_records_inside():
    k = FakeKernel("k")
    launch(k, (2, 3))(1, x=2)
    assert k.log == [("k", (2, 3), (1,), {"x": 2})]
    with recording() as rec:
        launch(k, (4,))(5, y=6)
    assert k.log == [("k", (2, 3), (1,), {"x": 2})], "a recorded launch must not run"
    assert [(r.name, r.grid, r.args, r.kwargs) for r in rec] == [("k", (4,), (5,), {"y": 6})]
    launch(k, (1,))()       # recording ended: launches run again
    assert len(k.log) == 2


def test_recording_is_per_thread_and_not_nested():
    k = FakeKernel("k")
    with recording():
        t = threading.Thread(target=lambda: launch(k, (1,))())
        t.start()
        t.join()
        with pytest.raises(RuntimeError, match="already active"):
            with recording():
                pass
    assert len(k.log) == 1, "another thread's launch ran while this one recorded"


def test_compile_launches_parallel_per_kernel_in_order_and_failures_reported():
    a, b, bad = FakeKernel("a"), FakeKernel("b"), FakeKernel("bad")
    barrier = threading.Barrier(2, timeout=20)
    seen = []

    def compile_one(item: Launch, device):
        if item.name == "bad":
            raise RuntimeError("out of resource: shared memory")
        if item.args == (0,):
            barrier.wait()      # a's and b's first launches meet here: they compile at the same time
        seen.append((item.name, item.args[0], threading.current_thread().name))

    launches = [Launch(a, (1,), (0,), {}), Launch(b, (1,), (0,), {}), Launch(a, (1,), (1,), {}),
                Launch(bad, (1,), (0,), {}), Launch(bad, (1,), (1,), {})]
    errors = compile_launches(launches, "cpu", jobs=3, compile_one=compile_one)
    assert set(errors) == {"bad"} and "shared memory" in str(errors["bad"])
    assert [s[1] for s in seen if s[0] == "a"] == [0, 1], "a kernel's own launches compile in order"
    assert {s[0] for s in seen} == {"a", "b"}
    assert all(s[2].startswith("mixforge-compile") for s in seen)


def test_compile_ahead_off_below_two_jobs_and_dry_run_errors_returned():
    calls = []
    assert compile_ahead(lambda: calls.append(1), jobs=1) == {} and calls == []

    def broken():
        raise ValueError("no")
    errors = compile_ahead(broken, jobs=2, compile_one=lambda item, d: None)
    assert list(errors) == ["dry run"] and isinstance(errors["dry run"], ValueError)
    assert launch_mod.last_report["errors"] == {"dry run": "ValueError: no"}


def test_default_jobs_env(monkeypatch):
    monkeypatch.setenv(launch_mod.JOBS_ENV, "0")
    assert launch_mod.default_jobs() == 0
    monkeypatch.setenv(launch_mod.JOBS_ENV, "lots")
    with pytest.raises(ValueError, match="MIXFORGE_COMPILE_JOBS must be an integer"):
        launch_mod.default_jobs()
    monkeypatch.delenv(launch_mod.JOBS_ENV)
    assert 1 <= launch_mod.default_jobs() <= launch_mod.MAX_JOBS


# ---------------------------------------------------------------------------- the first call of a kind

def _spy_launches(ops, log, monkeypatch):
    """The ops' generated kernels log their real launches (name, grid, the arguments' kinds)."""
    module = ops.module
    for attr in [a for a in dir(module) if a.endswith("_kernel")]:
        real = getattr(module, attr)

        class Spy:
            __name__ = attr

            def __init__(self, real):
                self.real = real

            def __getitem__(self, grid, real=real, attr=attr):
                def go(*args, **kwargs):
                    log.append(signature(attr, grid, args, kwargs))
                    return real[grid](*args, **kwargs)
                return go
        monkeypatch.setattr(module, attr, Spy(real))


def signature(name, grid, args, kwargs):
    """What Triton specializes a launch on, as far as the CPU can tell: the grid, each argument's kind
    (tensor dtype and shape, int value, None) and every keyword (constexprs, launch options)."""
    def kind(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", a.dtype, tuple(a.shape))
        return a if isinstance(a, (int, float, bool, str, type(None))) else repr(a)
    return (name, tuple(grid), tuple(kind(a) for a in args), tuple(sorted((k, kind(v)) for k, v in kwargs.items())))


@pytest.fixture
def ahead_on_cpu(monkeypatch):
    """compile_first as on a GPU, with the Triton compile replaced by a recorder of what it was asked."""
    asked = []
    monkeypatch.setattr(custom_ops, "compiles_ahead", lambda device: True)
    monkeypatch.setattr(custom_ops, "_COMPILED_AHEAD", set())
    monkeypatch.setattr(launch_mod, "default_jobs", lambda: 4)
    monkeypatch.setattr(launch_mod, "triton_compile",
                        lambda item, device: asked.append(signature(item.name, item.grid, item.args, item.kwargs)))
    return asked


@pytest.mark.parametrize("case", ["gla", "mamba2-varlen", "retnet-state", "gla-recurrent"])
def test_first_call_compiles_what_the_call_launches_and_changes_nothing(ahead_on_cpu, monkeypatch, case):
    name = case.split("-")[0]
    mixer = mf.zoo.ALL[name]
    B, T, H, K, V = 2, 37, 2, 16, 16
    kw = dict(config=KernelConfig(chunk=16, sub_chunk=8, BV=16))
    if "varlen" in case:
        kw["cu_seqlens"] = torch.tensor([0, 5, 40, 74])
        B, T = 1, 74
    x = random_inputs(mixer, B=B, T=T, H=H, K=K, V=V, seed=3, requires_grad=True)
    if "state" in case:
        S0 = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(4)).requires_grad_()
        kw.update(initial_state=S0, output_final_state=True)
    path = "recurrent" if "recurrent" in case else "chunk"

    def fwd_bwd(ops):
        y, ST = getattr(ops, path)(**x, **kw)
        loss = y.square().sum() + (ST.sum() if ST is not None else 0)
        leaves = list(x.values()) + ([kw["initial_state"]] if "initial_state" in kw else [])
        return [y.detach()] + [g.detach() for g in torch.autograd.grad(loss, leaves)]

    ops = mf.compile(mixer)
    # the same call without compiling ahead, for the results
    monkeypatch.setattr(custom_ops, "compiles_ahead", lambda device: False)
    plain = fwd_bwd(ops)
    assert not ahead_on_cpu
    monkeypatch.setattr(custom_ops, "compiles_ahead", lambda device: True)

    real = []
    _spy_launches(ops, real, monkeypatch)
    launch_mod.last_report.clear()
    out = fwd_bwd(ops)
    assert launch_mod.last_report.get("errors") == {}, launch_mod.last_report
    assert ahead_on_cpu, "the first call compiled nothing ahead"
    # the dry backward takes no gradient of the final state; a loss using it launches with that gradient
    # (the kernels' USE_DST variant), compiled as it launches
    if "state" not in case:
        assert sorted(ahead_on_cpu, key=repr) == sorted(real, key=repr), "the dry run must record the real launches"
    else:
        assert {s[0] for s in ahead_on_cpu} == {s[0] for s in real}
    for a, b in zip(out, plain):
        assert torch.equal(a, b), "the dry run changed the call's results"

    # a second call of the same kind compiles nothing ahead; a call without a gradient is another kind
    n = len(ahead_on_cpu)
    fwd_bwd(ops)
    assert len(ahead_on_cpu) == n
    with torch.no_grad():
        getattr(ops, path)(**x, **kw)
    assert len(ahead_on_cpu) > n
