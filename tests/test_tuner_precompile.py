"""Compiling ahead of timing: the study's batches with a stand-in compiler, the spawned pool with a stand-in task."""
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

import mixforge as mf
from mixforge.codegen.config import KernelConfig
from mixforge.tuner import api
from mixforge.tuner import study as study_mod
from mixforge.tuner.cache import ConfigCache
from mixforge.tuner.precompile import Precompiler, _int_class, compile_shape, default_jobs, make_precompiler
from mixforge.tuner.runner import Shape
from mixforge.tuner.study import open_study, optimize
from mixforge.tuner.testing import (FakeCompiler, SyntheticObjective, cost_model, fake_compile_task,
                                    matches, small_space)

class Recording(SyntheticObjective):
    """Appends ("run", config) to `events`; raises KeyboardInterrupt at run number `interrupt_at` (from 0)."""

    def __init__(self, events=None, interrupt_at=None, **kw):
        super().__init__(**kw)
        self.events = events if events is not None else []
        inner = self.run

        def run(cfg, x):
            self.events.append(("run", cfg))
            if interrupt_at is not None and len(self.calls) == interrupt_at:
                self.calls.append(cfg)
                raise KeyboardInterrupt
            return inner(cfg, x)

        self.run = run


def evaluated(study):
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)
            and t.user_attrs.get("reason") in (None, *study_mod.DEFINITIVE_FAILS)]


def test_grid_compiles_everything_first_and_never_times_a_config_that_does_not_compile():
    sp = small_space()
    events = []
    fails = matches(chunk=64, sub_chunk=16, BV=64)   # the true optimum and its neighbours do not compile
    comp = FakeCompiler(fail=fails, events=events)
    obj = Recording(events)
    st = open_study("grid", optuna.storages.InMemoryStorage(), seed=0)
    rep = optimize(st, sp, obj, n_trials=1, grid=True, compiler=comp)
    # one call with the whole grid, before any config is timed
    assert len(comp.batches) == 1 and sorted(map(repr, comp.batches[0])) == sorted(map(repr, sp.grid()))
    assert [kind for kind, _ in events[:len(sp.grid())]] == ["compile"] * len(sp.grid())
    failed = [t for t in st.trials if t.state == TrialState.FAIL]
    assert {sp.config(t.params) for t in failed} == {c for c in sp.grid() if fails(c)}
    for t in failed:
        assert t.user_attrs["reason"] == "compile_error" and "CompilationError" in t.user_attrs["error"]
        assert t.user_attrs["precompiled"] and t.user_attrs["compile_s"] == 2.5
    assert not any(fails(c) for c in obj.calls), "a config that does not compile was timed"
    assert rep.compile_failed == len(failed) == rep.failed and rep.compiled == len(sp.grid()) - len(failed)
    assert rep.best_config == min((c for c in sp.grid() if not fails(c)), key=cost_model)
    assert not fails(rep.best_config) and rep.timing_wall_s > 0 and rep.compile_wall_s >= 0
    # compile failures are definitive: the same grid again compiles and runs nothing
    again = optimize(st, sp, obj, n_trials=1, grid=True, compiler=comp)
    assert again.new_evaluated == 0 and len(comp.batches) == 1


def test_optuna_batches_are_compiled_together_then_timed_and_no_config_runs_twice():
    sp = small_space()
    events = []
    fails = matches(num_warps=8, strategy="two_pass")
    unknown = matches(chunk=32, sub_chunk=32)          # not judged by the compiler: timed (compiled inline)
    comp = FakeCompiler(fail=fails, unknown=unknown, events=events)
    obj = Recording(events)
    base = KernelConfig(chunk=32, sub_chunk=16, BV=32, num_warps=8, strategy="fused")
    st = open_study("batches", optuna.storages.InMemoryStorage(), seed=3)
    rep = optimize(st, sp, obj, n_trials=14, batch=4, baseline=base, compiler=comp)
    assert [len(b) for b in comp.batches] == [4, 4, 4, 2]   # the last batch: what the target still needs
    assert comp.batches[0][0] == base
    assert len(comp.compiled) == len(set(comp.compiled)) == 14 == rep.evaluated
    # each batch is compiled, then its configs that compiled (or were not judged) are timed in order
    expected = []
    for b in comp.batches:
        expected += [("compile", c) for c in b] + [("run", c) for c in b if not fails(c) or unknown(c)]
    assert events == expected
    configs = [sp.config(t.params) for t in evaluated(st)]
    assert len(configs) == len(set(configs)) == 14 and set(configs) == set(comp.compiled)
    for t in evaluated(st):
        cfg = sp.config(t.params)
        if unknown(cfg):
            assert t.state == TrialState.COMPLETE and "precompiled" not in t.user_attrs
        elif fails(cfg):
            assert t.state == TrialState.FAIL and t.user_attrs["reason"] == "compile_error"
    assert rep.compile_failed == sum(fails(c) and not unknown(c) for c in comp.compiled)
    assert rep.compile_unknown == sum(unknown(c) for c in comp.compiled)
    assert not fails(rep.best_config) or unknown(rep.best_config)
    assert not [t for t in st.trials if t.state == TrialState.RUNNING]


def test_an_interrupted_batch_resumes_without_compiling_or_running_a_finished_config_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.sqlite3'}"
    sp = small_space()
    fails = matches(num_warps=8, BV=32)
    comp = FakeCompiler(fail=fails)
    first = Recording(interrupt_at=5)   # Ctrl-C inside the second batch
    with pytest.raises(KeyboardInterrupt):
        optimize(open_study("resume", url, seed=0), sp, first, n_trials=12, batch=4, compiler=comp)
    study_mod._STORAGES.clear()   # a "new process": a fresh storage object on the same file
    st = open_study("resume", url, seed=0)
    assert not [t for t in st.trials if t.state == TrialState.RUNNING]
    released = [t for t in st.trials if t.user_attrs.get("reason") == "interrupted"]
    # released, retryable: the stopped trial and the rest of its batch; every earlier config finished
    last = comp.batches[-1]
    stopped = last.index(first.calls[-1])
    assert len(comp.batches) == 2 and sorted(map(repr, (sp.config(t.params) for t in released))) == sorted(
        map(repr, last[stopped:]))
    finished = {sp.config(t.params) for t in evaluated(st)}
    assert finished == set(comp.compiled) - set(last[stopped:])

    comp2 = FakeCompiler(fail=fails)
    second = Recording()
    rep = optimize(st, sp, second, n_trials=12, batch=4, compiler=comp2)
    assert rep.evaluated == 12
    assert not finished & set(comp2.compiled), "a finished config was compiled again"
    assert not finished & set(second.calls), "a finished config ran again"
    configs = [sp.config(t.params) for t in evaluated(st)]
    assert len(configs) == len(set(configs)) == 12


def test_a_timeout_inside_a_batch_releases_the_untimed_trials_for_the_next_call():
    sp = small_space()
    comp = FakeCompiler()
    slow = [0.15]
    obj = SyntheticObjective(sleep=lambda c: slow[0])
    st = open_study("deadline", optuna.storages.InMemoryStorage(), seed=0)
    rep = optimize(st, sp, obj, n_trials=10, batch=6, compiler=comp, timeout=0.35)
    assert rep.stop_reason == "timeout" and comp.timeouts[0] is not None and comp.timeouts[0] <= 0.35
    released = [t for t in st.trials if t.user_attrs.get("reason") == "deadline"]
    assert released and all(t.state == TrialState.FAIL for t in released)
    assert len(obj.calls) + len(released) == 6 and not [t for t in st.trials if t.state == TrialState.RUNNING]
    slow[0] = 0.0
    rep = optimize(st, sp, obj, n_trials=10, batch=6, compiler=comp)
    assert rep.evaluated == 10 and len(obj.calls) == len(set(obj.calls)) == 10


def test_two_workers_with_batches_never_run_a_config_twice():
    sp = small_space()
    storage = optuna.storages.InMemoryStorage()
    open_study("shared", storage, seed=0)
    n, runs = 16, {}

    def work(seed):
        obj = SyntheticObjective(sleep=lambda c: 0.005)
        optimize(open_study("shared", storage, seed=seed), sp, obj, n_trials=n, batch=3,
                 compiler=FakeCompiler(sleep=0.01))
        runs[seed] = obj.calls

    threads = [threading.Thread(target=work, args=(s,)) for s in (11, 12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    a, b = runs[11], runs[12]
    assert a and b and not set(a) & set(b)
    assert len(a) == len(set(a)) and len(b) == len(set(b))
    done = evaluated(open_study("shared", storage, seed=0))
    assert n <= len(done) <= n + 1 and len(done) == len(a) + len(b)


# --------------------------------------------------------------------------- tune, the CLI, the CPU no-op

def test_tune_gives_each_kernel_a_compiler_closes_it_and_reports_compile_and_timing_walls(tmp_path):
    made = []

    def precompiler(mixer, kernel, shape, dtype, *, jobs, seed, device, max_chunk, callback):
        assert max_chunk == 16   # the interpreter space's largest chunk: the compile shape's period
        comp = FakeCompiler(fail=matches(num_warps=2), sleep=0.01)
        made.append((kernel, jobs, comp))
        return comp

    report = api.tune("gla", (2, 64, 2, 16, 16), "fp32", trials=6, jobs=3, precompiler=precompiler,
                      objective=lambda mixer, kernel, shape, dtype, **kw: SyntheticObjective(),
                      storage=f"journal:{tmp_path / 'j.log'}", cache=ConfigCache(tmp_path / "c.json"))
    assert [k for k, _, _ in made] == ["chunk_fwd", "chunk_bwd"]
    for r, (_, jobs, comp) in zip(report, made):
        assert jobs == 3 and comp.closed and max(len(b) for b in comp.batches) == 3
        assert r.jobs == 3 and r.compile_wall_s >= 0.01 and r.timing_wall_s > 0 and r.trials_run == 6
        assert r.config.num_warps != 2 and r.trials_failed == sum(c.num_warps == 2 for c in comp.compiled)


def test_tune_starts_from_what_the_shape_runs_untuned(tmp_path, monkeypatch):
    """The baseline (enqueued first, so never beaten by a slower pick) is the heuristic with its forward
    strategy fitted to the shape, as the ops run it: paired for mamba2 at B*H = 16, T = 32768."""
    monkeypatch.setattr(api, "interpret_mode", lambda: False)   # the GPU space and heuristic, no GPU needed
    obj = SyntheticObjective()
    report = api.tune(mf.zoo.mamba2, (1, 32768, 16, 128, 128), "bf16", kernels=["chunk_fwd"], trials=2, jobs=0,
                      objective=lambda mixer, kernel, shape, dtype, **kw: obj,
                      storage=f"journal:{tmp_path / 'j.log'}", cache=ConfigCache(tmp_path / "c.json"))
    r, = list(report)
    assert r.baseline_config.strategy == "paired" and obj.calls[0] == r.baseline_config


def test_a_tune_is_keyed_by_the_dimensions_the_mixer_has(tmp_path):
    """griffin keeps one channel a head (no operand has a key axis: its calls have K = 1, whatever K a tune's
    shape names), so its configs are tuned, keyed and found at K = 1; the lookup then serves its calls."""
    from mixforge.codegen.config import ShapeKey
    from mixforge.tuner.lookup import TunedLookup

    cache, shapes = ConfigCache(tmp_path / "c.json"), []
    report = api.tune(mf.zoo.griffin, (1, 64, 2, 16, 8), "fp32", kernels=["chunk_fwd"], trials=2, jobs=0,
                      objective=lambda mixer, kernel, shape, dtype, **kw: shapes.append(shape) or SyntheticObjective(),
                      storage=f"journal:{tmp_path / 'j.log'}", cache=cache)
    r, = list(report)
    assert (r.key.K, r.key.V) == (1, 8) and {(s.K, s.V) for s in shapes} == {(1, 8)}
    look = TunedLookup(user=cache, shipped=[], autotune=False)
    assert look.resolve(mf.zoo.griffin, ShapeKey("chunk_fwd", "fp32", 1, 64, 2, 1, 8)).source == "user"
    assert api.call_shape(mf.zoo.gla, api.Shape(1, 64, 2, 16, 8)) == api.Shape(1, 64, 2, 16, 8)


def test_precompile_is_a_no_op_on_cpu_and_the_interpreter():
    assert default_jobs() == 0
    assert make_precompiler(mf.zoo.gla, "chunk_fwd", (1, 16, 1, 16, 16), "fp32", jobs=8) is None


# --------------------------------------------------------------------------- what the workers build

def test_the_compile_shape_keeps_the_specialization_of_every_integer_the_kernels_take():
    """T, B*T, B, and the chunk counts B*ceil((T + s) / chunk) keep their class (== 1, % 16, 32 bits)."""
    def ints(B, T):
        return [T, B * T, B] + [B * -(-(T + s) // c) for c in (8, 16, 32, 64, 128) for s in (0, 1)]

    for B in (1, 2, 3, 4, 16, 17, 18, 33, 64):
        for T in (1, 2, 15, 16, 17, 128, 129, 2048, 2200, 4095, 4096, 4097, 4100, 8192, 65536 + 7):
            s = compile_shape(Shape(B, T, 3, 64, 32), max_chunk=128)
            assert (s.H, s.K, s.V) == (3, 64, 32) and s.B <= B and s.T <= T
            assert [_int_class(x) for x in ints(s.B, s.T)] == [_int_class(x) for x in ints(B, T)], (B, T, s)
    assert compile_shape(Shape(4, 4096, 16, 128, 128)).astuple() == (4, 2048, 16, 128, 128)
    assert compile_shape(Shape(64, 65536, 16, 128, 128)).astuple() == (16, 2048, 16, 128, 128)
    assert compile_shape(Shape(4, 4096, 16, 128, 128), max_chunk=16).astuple() == (4, 256, 16, 128, 128)


@pytest.mark.parametrize("name", ["gla", "mamba2"])
def test_workers_rebuild_the_same_kernel_source_from_the_mixer_json(name):
    """The pool ships the mixer as JSON; a different source would be a different Triton cache entry."""
    from mixforge.codegen.plan import build_plan
    from mixforge.codegen.render import render_module
    from mixforge.spec import Mixer

    m = getattr(mf.zoo, name)
    again = Mixer.from_json(m.to_json())
    assert again.content_hash == m.content_hash
    assert render_module(build_plan(again)) == render_module(build_plan(m))


def test_the_spawned_pool_tells_compile_failures_from_harness_errors_and_stops_at_its_time_limit():
    cfgs = [KernelConfig(chunk=c, BV=b) for c in (32, 64, 128) for b in (16, 32)]
    real = [KernelConfig(chunk=16, sub_chunk=8, BV=16), KernelConfig(chunk=8, sub_chunk=16, BV=16)]
    shape = Shape(1, 20, 1, 16, 16)
    spec = {"fail": [cfgs[1].to_dict()], "raise": [cfgs[2].to_dict()], "hang": [cfgs[5].to_dict()],
            "real": [c.to_dict() for c in real],   # the real task, with the spec a Precompiler builds
            "real_spec": {**Precompiler(mf.zoo.gla, "chunk_fwd", shape, "fp32", jobs=1, env={}).spec,
                          "device": "cpu"}}
    assert spec["real_spec"]["compile_shape"] == [1, 20, 1, 16, 16]
    seen = []
    with Precompiler(None, "chunk_fwd", shape, "fp32", jobs=1, task=fake_compile_task, spec=spec,
                     env={"CUDA_VISIBLE_DEVICES": "3"}, callback=lambda c, r: seen.append(c)) as pc:
        out = pc(cfgs[:5] + cfgs[:1] + real)
        assert sorted(map(repr, seen)) == sorted(map(repr, cfgs[:5] + real))
        assert [out[c].status for c in cfgs[:5]] == ["ok", "failed", "unknown", "ok", "ok"]
        assert out[cfgs[1]].reason == "compile_error" and "CUDA_VISIBLE_DEVICES=3" in out[cfgs[1]].error
        assert "the harness broke" in out[cfgs[2]].error
        # the real task in a spawned worker: the objective is built from the mixer's JSON and runs
        assert out[real[0]].status == "ok", out[real[0]]
        assert out[real[1]].status == "unknown" and "sub_chunk" in out[real[1]].error
        t0 = time.perf_counter()
        with pytest.warns(RuntimeWarning, match="compiled nothing"):
            out = pc([cfgs[5], cfgs[0]], timeout=0.5)   # a compile that hangs: the worker is stopped
        assert time.perf_counter() - t0 < 15
        assert {r.status for r in out.values()} == {"unknown"} and "within 0.5 s" in out[cfgs[5]].error
        assert pc._pool is None


def test_the_worker_task_builds_the_objective_at_the_compile_shape_and_judges_only_compiler_errors(monkeypatch):
    """The task in-process (the interpreter: no compile-only mode, the objective really runs)."""
    import types

    from mixforge.codegen.config import ShapeKey
    from mixforge.tuner import precompile as pc

    monkeypatch.setattr(pc, "_W", {})
    shape = Shape(2, 600, 1, 16, 16)
    spec = {"mixer": mf.zoo.gla.to_json(), "kernel": "chunk_fwd", "shape": list(shape.astuple()),
            "compile_shape": list(compile_shape(shape, max_chunk=16).astuple()), "dtype": "fp32", "seed": 0,
            "device": "cpu"}
    assert pc._compile_task(spec, KernelConfig(chunk=16, sub_chunk=8, BV=16).to_dict())["status"] == "ok"
    assert tuple(pc._W["objective"].inputs["q"].shape[:2]) == (2, 88)
    # an error that is not the compiler's (here codegen's validation): not judged, the timing run decides
    bad = pc._compile_task(spec, KernelConfig(chunk=8, sub_chunk=16, BV=16).to_dict())
    assert bad["status"] == "unknown" and "ValueError" in bad["error"]
    # an error the compiler raised, whatever it became on its way up: the config's
    oor = type("OutOfResources", (Exception,), {})

    def run(cfg, inputs):
        pc._W["compile_error"] = ("chunk_bwd_kernel", oor("out of resource: shared memory"))
        raise RuntimeError("re-raised by autograd")

    monkeypatch.setattr(pc, "_objective", lambda spec: types.SimpleNamespace(run=run, inputs=None))
    r = pc._compile_task(spec, KernelConfig().to_dict())
    assert r["status"] == "failed" and r["reason"] == "out_of_resources" and "chunk_bwd_kernel" in r["error"]
    # the other kernels' configs are looked up at the timing run's shape, whatever the worker's
    at = pc._AtShape(lambda mixer, sk: sk, Shape(4, 4096, 16, 128, 128))
    assert at(None, ShapeKey("chunk_fwd", "bf16", 2, 16, 16, 128, 128)) == \
        ShapeKey("chunk_fwd", "bf16", 4, 4096, 16, 128, 128)
    assert at(None, ShapeKey("step", "bf16", 2, 1, 16, 128, 128)).T == 1
