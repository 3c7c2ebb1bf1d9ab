"""`tune`: the front door's tuning call. Key -> cache hit, or study -> best config -> cache."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Optional

import torch

from mixforge.codegen.config import KernelConfig

from .cache import ConfigCache
from .keys import TuneKey, dtype_name, interpret_mode, make_key
from .lookup import default_lookup, tuning_guard
from .precompile import default_jobs
from .runner import Shape, make_objective
from .space import AXES, DEFAULT_KERNELS, KERNELS, Problem, build_space, default_axes
from .study import Compiler, Objective, StudyReport, _ran, evaluate, open_study, optimize, quiet_optuna

DEFAULT_TRIALS = 50

ObjectiveFactory = Callable[..., Objective]
#: (mixer, kernel, shape, dtype, *, jobs, seed, device, callback) -> a study.Compiler (with close()), or None
PrecompilerFactory = Callable[..., Optional[Compiler]]


@dataclasses.dataclass
class KernelResult:
    key: TuneKey
    kernel: str
    shape: Shape
    cache_hit: bool
    config: Optional[KernelConfig]
    time_ms: Optional[float]
    baseline_config: Optional[KernelConfig]
    baseline_ms: Optional[float]
    grid_size: int = 0
    trials_run: int = 0          # evaluated by this call
    trials_failed: int = 0
    trials_rejected: int = 0
    study_trials: int = 0        # evaluated in the study, all calls and workers
    study_name: str = ""
    stop_reason: str = ""
    report: Optional[StudyReport] = None
    wall_s: float = 0.0
    jobs: int = 0                # compile workers (0: every trial compiled inline)
    compile_wall_s: float = 0.0  # this call: parallel compilation ahead of timing
    timing_wall_s: float = 0.0   # this call: the serial trials (inline compiles included)
    cold_compiles: int = 0       # kernels the timing loop compiled itself (0 after a complete precompile)

    @property
    def speedup(self) -> Optional[float]:
        if self.time_ms and self.baseline_ms:
            return self.baseline_ms / self.time_ms
        return None


@dataclasses.dataclass
class TuneReport:
    mixer: str
    dtype: str
    results: list[KernelResult]

    @property
    def trials_run(self) -> int:
        return sum(r.trials_run for r in self.results)

    @property
    def cache_hit(self) -> bool:
        return bool(self.results) and all(r.cache_hit for r in self.results)

    def __iter__(self):
        return iter(self.results)


def _shapes(shapes) -> list[Shape]:
    if isinstance(shapes, (Shape, str, dict)):
        return [Shape.parse(shapes)]
    shapes = list(shapes)
    if shapes and all(isinstance(x, int) for x in shapes):
        return [Shape.parse(shapes)]
    return [Shape.parse(s) for s in shapes]


def call_shape(mixer, shape: Shape) -> Shape:
    """`shape` as the mixer's calls have it, which is how the ops look configs up: K = 1 where no operand has
    a key axis (griffin's maps keep one channel a head: fq = 1), V = 1 where none has a value axis. A config
    tuned under the K a shape names would be keyed where no call of the mixer ever looks."""
    from mixforge.spec.symbols import KEY, VALUE

    dims = {o.dim for o in mixer.operands}
    return dataclasses.replace(shape, K=shape.K if KEY in dims else 1, V=shape.V if VALUE in dims else 1)


def tune(mixer, shapes, dtype="bf16", *, kernels: Optional[Iterable[str]] = None, trials: int = DEFAULT_TRIALS,
         storage: Optional[str] = None, timeout: Optional[float] = None, trial_timeout: Optional[float] = 300.0,
         seed: int = 0, force: bool = False, grid: bool = False, cache: Optional[ConfigCache] = None,
         objective: Optional[ObjectiveFactory] = None, timer=None, device=None, study_suffix: str = "",
         axes: Optional[dict] = None, callback: Optional[Callable[[dict], None]] = None,
         jobs: Optional[int] = None, batch: Optional[int] = None,
         precompiler: Optional[PrecompilerFactory] = None) -> TuneReport:
    """Tune `mixer`'s kernels for `shapes` (one (B, T, H, K, V) or a list) and `dtype`; cache the best configs.
    A K or V the mixer has no axis for is taken as 1 (`call_shape`), as its calls have it.

    kernels: default ("chunk_fwd", "chunk_bwd"). trials: the study's target number
    of evaluated trials per kernel (a repeated call with the same or fewer trials is
    a cache hit and runs nothing; more trials resume the study). storage: an Optuna
    storage URL (default: SQLite under the cache dir; journal:FILE, postgresql://...
    let several processes fill one study). timeout: seconds for the whole call,
    shared among the kernels still to tune. trial_timeout: seconds per trial.
    grid=True runs the whole pruned grid. force=True tunes even on a cache hit.
    objective: a factory (mixer, kernel, shape, dtype, *, timer, seed) -> Objective,
    by default the real compiled ops (runner.make_objective).
    axes: {axis: values} overriding the default values of the axes a kernel searches
    (e.g. {"num_stages": (1, 2)}); the study of a different space is a different study.
    jobs: processes that compile candidate configs in parallel before they are timed (precompile.py);
    default: every CPU core on a CUDA machine, none on CPU/the interpreter (nothing to compile there);
    0 or 1: each trial compiles inline. batch: trials asked and compiled together (default `jobs`;
    grid=True: the whole grid first, or batches of `batch`, which keep progress when `timeout` may
    cut the run short). precompiler: a factory of the compiler (tests); by default
    precompile.make_precompiler with the real objective, none with a custom `objective`.
    """
    from mixforge.spec import load_mixer

    mixer = load_mixer(mixer)
    dt = dtype_name(dtype)
    kernels = list(kernels or DEFAULT_KERNELS)
    for k in kernels:
        if k not in KERNELS:
            raise ValueError(f"unknown kernel {k!r}; expected one of {', '.join(KERNELS)}")
    if trials < 1:
        raise ValueError("trials must be >= 1")
    cache = cache or ConfigCache()
    factory = objective or make_objective
    if precompiler is None and objective is None:
        from .precompile import make_precompiler as precompiler
    jobs = default_jobs() if jobs is None else max(0, int(jobs))
    notify = callback or (lambda e: None)
    todo = [(call_shape(mixer, s), k) for s in _shapes(shapes) for k in kernels]
    deadline = time.monotonic() + timeout if timeout else None
    results = []
    interp = interpret_mode()
    with quiet_optuna(), tuning_guard():
        for i, (shape, kernel) in enumerate(todo):
            t0 = time.perf_counter()
            if kernel == "step":  # one token per call: the ops look it up with T = 1
                shape = Shape(shape.B, 1, shape.H, shape.K, shape.V)
            key = make_key(mixer.content_hash, kernel, dt, *shape.astuple())
            space = kernel_space(kernel, Problem.of(mixer, shape.K, shape.V, dt), interp, axes)
            # what this shape runs untuned (strategy fitted to B*H and T): enqueued first, so a tune never
            # ships a config slower than it (a 6-trial tune at B=1, T=32768 did, against the unfitted one)
            baseline = space.heuristic(interp, NH=shape.B * shape.H, T=shape.T)
            entry = cache.get(key)
            target = len(space.grid()) if grid else min(trials, len(space.grid()))
            if entry is not None and not force and entry.get("trials", {}).get("target", 0) >= target:
                r = KernelResult(key, kernel, shape, True, KernelConfig.from_dict(entry["config"]), entry["time_ms"],
                                 baseline, entry.get("baseline_ms"), grid_size=len(space.grid()),
                                 study_name=entry.get("study", ""), study_trials=entry["trials"].get("evaluated", 0),
                                 stop_reason="cache hit")
                results.append(r)
                notify({"kind": "cache_hit", "kernel": kernel, "shape": shape, "key": key})
                continue
            name = key.study_name(space.hash) + (f"/{study_suffix}" if study_suffix else "")
            study = open_study(name, storage, seed=seed)
            # a study keeps the shape it was started with, so its timings stay comparable
            run_shape = Shape.parse(study.user_attrs.get("shape", shape.astuple()))
            if "shape" not in study.user_attrs:
                study.set_user_attr("shape", list(shape.astuple()))
                study.set_user_attr("mixer", mixer.name)
            obj = factory(mixer, kernel, run_shape, dt, timer=timer, seed=seed) if device is None else \
                factory(mixer, kernel, run_shape, dt, timer=timer, seed=seed, device=device)
            already = sum(1 for t in study.get_trials(deepcopy=False) if _ran(t))
            notify({"kind": "start", "kernel": kernel, "shape": shape, "key": key, "n_trials": target,
                    "done": min(already, target), "grid_size": len(space.grid()), "study": name})
            remaining = None
            if deadline is not None:
                remaining = max(0.0, (deadline - time.monotonic()) / (len(todo) - i))
            kernel_notify = lambda e, kernel=kernel: notify({**e, "kernel": kernel})  # noqa: E731
            comp = None
            if precompiler is not None:
                comp = precompiler(mixer, kernel, run_shape, dt, jobs=jobs, seed=seed, device=device,
                                   max_chunk=max(c.chunk for c in space.grid()), callback=lambda cfg, res, kn=kernel_notify: kn(
                                       {"kind": "compiled_one", "config": cfg, "status": res.status}))
            try:
                rep = optimize(study, space, obj, n_trials=target, timeout=remaining, trial_timeout=trial_timeout,
                               grid=grid, baseline=baseline, seed=seed, callback=kernel_notify, compiler=comp,
                               batch=None if comp is None else batch if grid else batch or max(1, jobs))
            finally:
                close = getattr(comp, "close", None)
                if close is not None:
                    close()  # the workers' CUDA contexts go before the next kernel's study
            base_ms = rep.baseline_ms
            if base_ms is None and baseline not in set(space.grid()):
                base_ms = _baseline_outside(study, obj, baseline, trial_timeout)
            r = KernelResult(key, kernel, shape, False, rep.best_config, rep.best_ms, baseline, base_ms,
                             grid_size=rep.grid_size, trials_run=rep.new_evaluated, trials_failed=rep.new_failed,
                             trials_rejected=rep.new_rejected, study_trials=rep.evaluated, study_name=name,
                             stop_reason=rep.stop_reason, report=rep, wall_s=time.perf_counter() - t0,
                             jobs=jobs if comp is not None else 0, compile_wall_s=rep.compile_wall_s,
                             timing_wall_s=rep.timing_wall_s, cold_compiles=rep.cold_compiles)
            if rep.best_config is not None:
                # a study stopped short (timeout) records what it reached: the same tune again resumes it
                finished = rep.stop_reason in ("target reached", "space exhausted", "grid done")
                cache.put(key, rep.best_config, rep.best_ms, baseline_ms=base_ms, mixer_name=mixer.name,
                          shape=list(run_shape.astuple()), study=name, torch=torch.__version__,
                          trials={"target": target if finished else rep.evaluated, "evaluated": rep.evaluated,
                                  "complete": rep.complete, "failed": rep.failed, "rejected": rep.rejected})
            results.append(r)
    default_lookup().invalidate()
    return TuneReport(mixer.name, dt, results)


def kernel_space(kernel: str, problem: Problem, interpret: bool, axes: Optional[dict] = None):
    """The kernel's space on this device, with `axes` overriding the values of the axes it searches."""
    if not axes:
        return build_space(kernel, problem, interpret=interpret)
    unknown = set(axes) - set(AXES)
    if unknown:
        raise ValueError(f"unknown axes {sorted(unknown)}; expected some of {', '.join(AXES)}")
    base = default_axes(kernel, problem, interpret)
    return build_space(kernel, problem, interpret=interpret,
                       axes={a: tuple(axes.get(a, v)) for a, v in base.items()})


def _baseline_outside(study, obj: Objective, baseline: KernelConfig, trial_timeout) -> Optional[float]:
    """Time the heuristic config when the space pruned it (kept in the study's user attrs, measured once)."""
    if "baseline_ms" in study.user_attrs:
        return study.user_attrs["baseline_ms"]
    res = evaluate(obj, baseline, trial_timeout)
    ms = res.get("value")
    study.set_user_attr("baseline_ms", ms)
    study.set_user_attr("baseline_result", {k: v for k, v in res.items() if k in ("reason", "error")} or None)
    return ms
