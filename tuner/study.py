"""One Optuna study per TuneKey: seeded TPE over the pruned space, every candidate checked, failures recorded.

The mechanics, independent of any kernel: an `Objective` holds fixed inputs, a
runner `(config, inputs) -> (outputs, time_ms)` and the trusted outputs the
runner's outputs must match. `optimize` drives the study with Optuna's
ask/tell on the study's own storage, so several processes (or machines) can
fill one study:

* a trial's params are sampled per axis (categorical over the values of the
  valid grid) by a seeded TPE sampler; a combination outside the valid grid is
  told PRUNED (user attr skipped="invalid") and never built;
* a config that some other trial already ran (or is running) is told PRUNED
  (skipped="duplicate"): a config is never run twice. Of two concurrent trials
  with equal params, the lower trial number runs, so no order of events runs both
  (`_claim`: a trial claims its config only after the later trials that might
  still take it have decided);
* an exception while building or running is a FAIL with user attr reason
  (compile_error, out_of_resources, out_of_memory, timeout, error, cuda_error);
* outputs that differ from the trusted ones are a FAIL with reason
  "wrong_result" and rejected=True (this routes around miscompiles);
* a complete config whose error is far above the study's best (`error_outliers`) is a miscompile the
  tolerance let through: it is reported as rejected (reason "error_outlier") and never chosen;
* an output the trusted computation itself cannot get within the tolerance at the kernel's precision (a
  gradient that is zero in exact arithmetic, a near-singular normalizer) is judged against that
  computation's own rounding noise (`Objective.conditioning`, asked only when a check fails), kept out of
  the trial's rel_err, and listed in its user attr ill_conditioned;
* only COMPLETE trials are ever chosen, so failed and rejected configs never win.

Compilation ahead of timing (`compiler`, see precompile.py): a Triton config
takes 20-100 s to compile on an H100, and the timing loop is serial (one GPU).
With a compiler, `optimize` asks `batch` trials at once (TPE's constant liar
sees the ones still running), compiles their configs in parallel, then times
them one by one, each now a Triton cache hit; the grid path compiles every
queued config first. A config that does not compile is told FAIL with the
compiler's reason (compile_error, out_of_resources) and never timed; one the
compiler could not judge (it ran out of time, a worker died) is timed as
without a compiler, compiling inline.

`n_trials` is the study's target number of evaluated trials (complete, failed,
rejected, or running elsewhere), not a per-call increment: an interrupted tune
resumes where it stopped, and workers sharing a study stop together.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import math
import os
import random
import signal
import socket
import threading
import time
import warnings
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState

from mixforge.codegen.config import KernelConfig

from .keys import tuner_dir
from .space import SearchSpace

Runner = Callable[[KernelConfig, dict], tuple[Any, float]]

#: FAIL reasons that mean "this config ran and lost"; other FAILs (interrupted, stale, deadline) may be retried
DEFINITIVE_FAILS = ("compile_error", "out_of_resources", "out_of_memory", "timeout", "error", "cuda_error",
                    "wrong_result", "bad_timing")
TOLERANCE = {"fp32": 2e-3, "fp16": 1e-2, "bf16": 2e-2}
#: Every correct config of a kernel computes the same sums in another order, so their errors against the
#: trusted outputs agree closely (the inputs' rounding dominates: 54 gla chunk_fwd configs on the H100 all
#: at 3.15e-3 to 3.16e-3). A config far above its study's best is a miscompile that the absolute tolerance
#: let through, and it never wins: mamba2's chunk_bwd with 64-row chunks and a pipelined value-block loop
#: (num_stages 2 and 3) came out at 2.0e-2 and 2.4e-2 against 2.9e-3 for its 11 other configs (Triton 3.6,
#: H100; gradients of the same config measured alone reached 3.9e-2). Below OUTLIER_FLOOR of the
#: tolerance, differences of summation order are no signal.
OUTLIER_FACTOR = 3.0
OUTLIER_FLOOR = 1 / 50
#: The chunked path keeps a state per chunk in HBM: the backward S and dS of every chunk, the two-pass
#: forward S. A config with longer chunks within MEMORY_TIE of the fastest one's time wins over it: the same
#: speed within timing noise, with fewer states. mamba2's backward at B = 16, T = 2048, H = 16, K = V = 128
#: (H100): 32-row chunks 2.716 ms and 1649 MiB at the fwd+bwd peak, 64-row chunks 2.727 ms (0.4% slower) and
#: 1137 MiB (keyblock_bench-20261123-061120); in a tune minutes later the same two took 2.196 and 2.223 ms
#: (1.2% apart; compare-tune-20261123-0616-h100-mamba2-bwd.log), so the tie is wider than that.
MEMORY_TIE = 0.02
#: An ill-conditioned output (its trusted value's own rounding noise above the tolerance) may differ from
#: the trusted value by this many times that noise: both are then rounding noise of similar size, and the
#: candidate's tiles may sum in a less favourable order than the trusted path.
NOISE_SLACK = 8.0
MAX_CONSECUTIVE_SKIPS = 40


class TrialTimeout(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """What a compiler (precompile.Precompiler, or a test's stand-in) says about one config.

    status "ok": compiled (the timing run finds it in Triton's cache); "failed": the
    config does not compile, `reason` compile_error or out_of_resources, `error` the
    message: told FAIL without timing; "unknown": not judged (out of time, a worker
    failed for a reason that is not the config's): timed as usual, compiling inline.
    """

    status: str
    reason: Optional[str] = None
    error: Optional[str] = None
    seconds: float = 0.0      # the worker's compile time for this config

    def __post_init__(self):
        if self.status not in ("ok", "failed", "unknown"):
            raise ValueError(f"unknown compile status {self.status!r}")


#: compiler(configs, timeout_s or None) -> {config: CompileResult}; a config left out is "unknown"
Compiler = Callable[[list, Optional[float]], "dict[KernelConfig, CompileResult]"]


class TunerAbort(RuntimeError):
    """The device is unusable (a sticky CUDA error); the process must restart to continue tuning."""


@dataclasses.dataclass
class Objective:
    """What one study measures."""

    inputs: Any
    run: Runner
    trusted: Callable[[Any], Any]      # inputs -> trusted outputs (computed once, lazily)
    tolerance: float = 2e-3
    describe: str = ""
    #: (inputs, trusted outputs) -> {output path: relative error of the trusted computation carried out at
    #: the kernel's precision}, from a second evaluation of it (`rounding_noise`); inf where an output is
    #: ill-conditioned but its noise has no estimate at this shape; None: no estimate at all
    conditioning: Optional[Callable[[Any, Any], dict]] = None
    #: a smaller problem whose trusted outputs are exact enough to judge the ill-conditioned outputs that
    #: this one cannot: a config whose outputs include such ones must pass it too
    secondary: Optional["Objective"] = None
    _trusted: Any = dataclasses.field(default=None, repr=False)
    _have_trusted: bool = dataclasses.field(default=False, repr=False)
    _noise: Optional[dict] = dataclasses.field(default=None, repr=False)

    def trusted_outputs(self):
        if not self._have_trusted:
            self._trusted = self.trusted(self.inputs)
            self._have_trusted = True
        return self._trusted

    def noise(self) -> Optional[dict]:
        """The trusted outputs' rounding noise per output path (computed once, lazily), or None."""
        if self._noise is None and self.conditioning is not None:
            self._noise = self.conditioning(self.inputs, self.trusted_outputs())
        return self._noise


# --------------------------------------------------------------------------- storage

_STORAGES: dict[str, Any] = {}


def default_storage_url() -> str:
    path = tuner_dir() / "studies.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def resolve_storage(url: Optional[str] = None):
    """An Optuna storage from a URL: sqlite:///..., postgresql://..., mysql://..., or journal:PATH (a journal file).

    None: the SQLite file under the cache dir, so an interrupted study resumes.
    """
    url = url or default_storage_url()
    if url in _STORAGES:
        return _STORAGES[url]
    if url.startswith("journal:"):
        path = url[len("journal:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError("journal storage needs a file: journal:PATH")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            from optuna.storages.journal import JournalFileBackend
        except ImportError:  # optuna < 4
            from optuna.storages import JournalFileStorage as JournalFileBackend
        storage = optuna.storages.JournalStorage(JournalFileBackend(path))
    elif url.startswith("sqlite:"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
        _sqlite_pragmas(storage)
    elif "://" in url:
        storage = optuna.storages.RDBStorage(url)
    else:
        raise ValueError(f"unrecognized storage {url!r}: use sqlite:///FILE, postgresql://..., mysql://... "
                         "or journal:FILE")
    _STORAGES[url] = storage
    return storage


def _sqlite_pragmas(storage) -> None:
    """WAL journal (readers never block the writer: several local workers) and fewer fsyncs.

    synchronous=NORMAL in WAL mode stays consistent after a crash of the process;
    only a power loss may drop the last transactions.
    """
    try:
        from sqlalchemy import event

        def on_connect(dbapi_conn, record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        event.listen(storage.engine, "connect", on_connect)
        storage.engine.dispose()  # connections opened before the listener
    except Exception:  # an older optuna/sqlalchemy: keep the defaults
        pass


def open_study(name: str, storage=None, *, seed: int = 0, n_startup_trials: int = 10) -> optuna.Study:
    storage = resolve_storage(storage) if storage is None or isinstance(storage, str) else storage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                             n_startup_trials=n_startup_trials)
    with quiet_optuna():
        return optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="minimize",
                                   load_if_exists=True)


# --------------------------------------------------------------------------- one trial

def classify(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc).lower()
    if name == "OutOfResources" or "out of resource" in text:
        return "out_of_resources"
    if name in ("CompilationError", "CompileTimeAssertionFailure", "UnsupportedLanguageConstruct", "PTXASError"):
        return "compile_error"
    if name == "OutOfMemoryError" or "out of memory" in text:
        return "out_of_memory"
    if any(s in text for s in ("illegal memory access", "unspecified launch failure", "illegal instruction",
                               "misaligned address", "device-side assert")):
        return "cuda_error"
    return "error"


@contextlib.contextmanager
def _deadline(seconds: Optional[float]):
    """Raise TrialTimeout in this thread after `seconds` (SIGALRM: main thread on Unix; else checked afterwards)."""
    use_alarm = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
                 and threading.current_thread() is threading.main_thread())
    if not use_alarm:
        yield
        return

    def fire(signum, frame):
        raise TrialTimeout(f"trial exceeded {seconds:g} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _leaves(x, path="out"):
    import torch

    if x is None:
        yield path, None
    elif isinstance(x, torch.Tensor):
        yield path, x
    elif isinstance(x, (tuple, list)):
        yield path, ("seq", len(x))
        for i, y in enumerate(x):
            yield from _leaves(y, f"{path}[{i}]")
    elif isinstance(x, dict):
        yield path, ("map", tuple(sorted(x)))
        for k in sorted(x):
            yield from _leaves(x[k], f"{path}.{k}")
    else:
        yield path, ("value", x)


def _rel(x, y) -> float:
    import torch

    xd = x.detach().to(torch.float64)  # on the outputs' device: no host copy of big tensors
    yd = y.detach().to(xd.device, torch.float64)
    return (xd - yd).norm().item() / max(yd.norm().item(), 1e-30)


def rounding_noise(trusted, other, scale: float = 1.0) -> dict:
    """{output path: scale * ||other - trusted|| / ||trusted||}: how far a second evaluation of the trusted
    computation at another precision moves each output, scaled to the kernel's precision."""
    import torch

    b = dict(_leaves(other))
    return {p: scale * _rel(b[p], y) for p, y in _leaves(trusted)
            if isinstance(y, torch.Tensor) and isinstance(b.get(p), torch.Tensor)}


def ill_conditioned(noise: Optional[dict], tolerance: float) -> list:
    """The output paths whose trusted value is itself not within `tolerance` at the kernel's precision."""
    return sorted(p for p, n in (noise or {}).items() if not n <= tolerance)


def compare(outputs, trusted, tolerance: float, noise: Optional[dict] = None) -> tuple[bool, float, str]:
    """(ok, worst relative error, detail): ||out - ref|| / ||ref|| per tensor, NaN/Inf never passes.

    With `noise` (see `rounding_noise`), an ill-conditioned output is held to NOISE_SLACK times its noise
    instead of the tolerance and left out of the worst error (which then measures the kernel, not the
    noise)."""
    import torch

    ill = set(ill_conditioned(noise, tolerance))

    a, b = list(_leaves(outputs)), list(_leaves(trusted))
    if [p for p, _ in a] != [p for p, _ in b]:
        return False, math.inf, "output structure differs from the trusted outputs"
    worst, where = 0.0, ""
    for (path, x), (_, y) in zip(a, b):
        if isinstance(y, torch.Tensor):
            if not isinstance(x, torch.Tensor):
                return False, math.inf, f"{path} is missing"
            if tuple(x.shape) != tuple(y.shape):
                return False, math.inf, f"{path} has shape {tuple(x.shape)}, expected {tuple(y.shape)}"
            if not torch.isfinite(x).all():
                return False, math.inf, f"{path} has NaN or Inf"
            err = _rel(x, y)
            if path in ill:
                if not err <= NOISE_SLACK * noise[path]:
                    return False, err, (f"{path}: relative error {err:.2e} > {NOISE_SLACK:g} x its trusted "
                                        f"value's rounding noise {noise[path]:.1e} (ill-conditioned)")
                continue
            if not (err <= worst):
                worst, where = err, path
        elif x != y:
            return False, math.inf, f"{path} differs"
    if worst > tolerance:
        return False, worst, f"{where}: relative error {worst:.2e} > {tolerance:.1e}"
    return True, worst, ""


def error_outliers(trials) -> set:
    """Numbers of the COMPLETE trials whose error against the trusted outputs is an outlier of the study:
    above OUTLIER_FACTOR times the smallest error of any complete trial and above OUTLIER_FLOOR of the
    tolerance it was checked with. Decided over the whole study, so the order trials ran in does not matter."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("rel_err") is not None]
    if not done:
        return set()
    least = min(t.user_attrs["rel_err"] for t in done)
    return {t.number for t in done
            if t.user_attrs["rel_err"] > OUTLIER_FACTOR * least
            and t.user_attrs["rel_err"] > OUTLIER_FLOOR * t.user_attrs.get("tolerance", math.inf)}


def evaluate(objective: Objective, cfg: KernelConfig, trial_timeout: Optional[float] = None) -> dict:
    """Run and check one config. Returns {'state', 'value', attrs...}; never raises except KeyboardInterrupt."""
    t0 = time.perf_counter()
    attrs: dict[str, Any] = {}
    trusted = objective.trusted_outputs()  # a failure here is the harness's, not the config's: it propagates
    try:
        with _deadline(trial_timeout):
            outputs, ms = objective.run(cfg, objective.inputs)
        wall = time.perf_counter() - t0
        if trial_timeout and wall > trial_timeout:
            raise TrialTimeout(f"trial took {wall:.1f} s > {trial_timeout:g} s")
    except KeyboardInterrupt:
        raise
    except TrialTimeout as e:
        return {"state": TrialState.FAIL, "reason": "timeout", "error": str(e), "wall_s": time.perf_counter() - t0}
    except Exception as e:  # a config that does not build or run is a failed trial, never fatal
        return {"state": TrialState.FAIL, "reason": classify(e), "error": f"{type(e).__name__}: {e}"[:800],
                "wall_s": time.perf_counter() - t0}
    attrs["wall_s"] = wall
    ok, err, detail = compare(outputs, trusted, objective.tolerance)
    secondary = None
    if not ok and math.isfinite(err) and objective.conditioning is not None:
        noise = objective.noise()   # only now: a second trusted evaluation costs as much as the first
        ill = ill_conditioned(noise, objective.tolerance)
        if ill:
            ok, err, detail = compare(outputs, trusted, objective.tolerance, noise=noise)
            attrs["ill_conditioned"] = ill
            if ok and objective.secondary is not None:
                secondary = evaluate(objective.secondary, cfg, trial_timeout)
    attrs["rel_err"] = err if math.isfinite(err) else None
    attrs["tolerance"] = objective.tolerance
    try:
        ms = float(ms)
    except (TypeError, ValueError):
        ms = math.nan
    if math.isfinite(ms):
        attrs["time_ms"] = ms
    if not ok:
        return {"state": TrialState.FAIL, "reason": "wrong_result", "rejected": True, "error": detail, **attrs}
    if secondary is not None and secondary["state"] != TrialState.COMPLETE:
        return {**attrs, "state": TrialState.FAIL, "reason": secondary.get("reason", "wrong_result"),
                "rejected": bool(secondary.get("rejected")),
                "error": f"{objective.secondary.describe}: {secondary.get('error')}"[:800]}
    if not (math.isfinite(ms) and ms > 0):
        return {"state": TrialState.FAIL, "reason": "bad_timing", "error": f"timer returned {ms!r}", **attrs}
    return {"state": TrialState.COMPLETE, "value": ms, **attrs}


# --------------------------------------------------------------------------- the loop

def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _cfg_of(t, space: SearchSpace) -> Optional[KernelConfig]:
    try:
        if all(a in t.params for a in space.axes):
            return space.config(t.params)
    except (TypeError, ValueError):
        pass
    return None


def _queued_cfg(t, space: SearchSpace) -> Optional[KernelConfig]:
    """The config of a trial, WAITING ones included (Optuna keeps an enqueued trial's params aside until
    it is asked)."""
    cfg = _cfg_of(t, space)
    if cfg is None and t.state == TrialState.WAITING:
        fixed = t.system_attrs.get("fixed_params") or {}
        try:
            if all(a in fixed for a in space.axes):
                return space.config(fixed)
        except (TypeError, ValueError):
            pass
    return cfg


def _ran(t) -> bool:
    """Did this trial run its config (or is it running it)? Such a config is never run again."""
    if t.state in (TrialState.COMPLETE, TrialState.RUNNING):
        return True
    return t.state == TrialState.FAIL and t.user_attrs.get("reason") in DEFINITIVE_FAILS


#: how long a trial waits for a later trial with the same config (another worker's) to decide
CLAIM_WAIT_S = 10.0


def _claim(study: optuna.Study, space: SearchSpace, trial, cfg: KernelConfig) -> Optional[str]:
    """Claim `cfg` for `trial` (user attr "claimed"), or say which trial has it.

    Workers write a trial's params, then read the others', in any interleaving. So a trial gives
    way to a finished one, a running one with a lower number, and a claimed one; and when a later
    trial with the same config is still deciding, it waits for that decision (that trial either saw
    this one and gives way, or claimed first). Of two concurrent trials, whichever reads second sees
    the other's params, so they never both run. Waits only go to higher numbers: no cycle. A later
    trial that never decides (its worker died) makes this one give way after CLAIM_WAIT_S.
    """
    give_up = time.monotonic() + CLAIM_WAIT_S
    while True:
        pending = None
        for t in study.get_trials(deepcopy=False):
            if t.number == trial.number or not _ran(t) or _cfg_of(t, space) != cfg:
                continue
            if t.state != TrialState.RUNNING or t.number < trial.number or t.user_attrs.get("claimed"):
                return f"duplicate of trial {t.number}"
            pending = t.number
        if pending is None:
            trial.set_user_attr("claimed", True)
            return None
        if time.monotonic() >= give_up:
            return f"duplicate of trial {pending} (undecided)"
        time.sleep(0.01)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale(study: optuna.Study, stale_after_s: float) -> int:
    """Mark RUNNING trials of dead workers FAIL (reason 'stale'), so their configs may run again."""
    n, host = 0, socket.gethostname()
    now = _dt.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        h, _, pid = worker.rpartition(":")
        dead = h == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))
        old = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > stale_after_s
        if dead or old:
            try:
                study._storage.set_trial_user_attr(t._trial_id, "reason", "stale")
                study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
                n += 1
            except Exception:  # finished meanwhile
                pass
    return n


@dataclasses.dataclass
class StudyReport:
    study_name: str
    grid_size: int
    best_config: Optional[KernelConfig]
    best_ms: Optional[float]
    best_trial: Optional[int]
    baseline_config: Optional[KernelConfig]
    baseline_ms: Optional[float]
    complete: int
    failed: int          # FAIL, not counting rejected
    rejected: int        # wrong results
    skipped: int         # PRUNED: invalid or duplicate samples, never built
    new_evaluated: int = 0   # evaluated by this call
    new_failed: int = 0
    new_rejected: int = 0
    stop_reason: str = ""
    history: list = dataclasses.field(default_factory=list)
    # this call's wall time compiling ahead (the parallel precompile) and timing (serial trials, each
    # compiling inline what was not precompiled); kernels the timing loop compiled itself
    compile_wall_s: float = 0.0
    timing_wall_s: float = 0.0
    compiled: int = 0            # configs the compiler built
    compile_failed: int = 0      # configs that do not compile (told FAIL, never timed)
    compile_unknown: int = 0     # configs the compiler could not judge (timed as usual)
    cold_compiles: int = 0
    # the fastest trial's time where a config with fewer chunk states won within MEMORY_TIE of it, else None
    fastest_ms: Optional[float] = None

    @property
    def evaluated(self) -> int:
        return self.complete + self.failed + self.rejected

    @property
    def speedup(self) -> Optional[float]:
        if self.best_ms and self.baseline_ms:
            return self.baseline_ms / self.best_ms
        return None


def state_rows(config: Optional[KernelConfig], kernel: str) -> float:
    """How many chunk states per token a config keeps in HBM, relative (1 / chunk, the paired forward's every
    2 * chunk rows); 0 where it keeps none (the fused forward, kernels that are not chunked)."""
    if config is None:
        return math.inf
    if kernel == "chunk_bwd" or (kernel == "chunk_fwd" and config.strategy == "two_pass"):
        return 1 / config.chunk
    if kernel == "chunk_fwd" and config.strategy == "paired":
        return 1 / (2 * config.chunk)
    return 0.0


def summarize(study: optuna.Study, space: SearchSpace, baseline: Optional[KernelConfig] = None) -> StudyReport:
    trials = study.get_trials(deepcopy=False)
    outliers = error_outliers(trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.number not in outliers]
    rejected = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("rejected")
                or t.number in outliers]
    failed = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("rejected")
              and t.user_attrs.get("reason") in DEFINITIVE_FAILS]
    skipped = [t for t in trials if t.state == TrialState.PRUNED]
    fastest = min(complete, key=lambda t: (t.value, t.number), default=None)
    best = fastest
    if fastest is not None:
        near = [t for t in complete if t.value <= fastest.value * (1 + MEMORY_TIE)]
        best = min(near, key=lambda t: (state_rows(_cfg_of(t, space), space.kernel), t.value, t.number))
    base_ms = None
    if baseline is not None:
        for t in complete:
            if _cfg_of(t, space) == baseline:
                base_ms = t.value
                break
    history = []
    for t in sorted(trials, key=lambda t: t.number):
        if t.state in (TrialState.COMPLETE, TrialState.FAIL):
            cfg = _cfg_of(t, space)
            history.append({"number": t.number, "state": t.state.name, "time_ms": t.value,
                            "reason": "error_outlier" if t.number in outliers else t.user_attrs.get("reason"),
                            "rejected": bool(t.user_attrs.get("rejected")) or t.number in outliers,
                            "rel_err": t.user_attrs.get("rel_err"), "worker": t.user_attrs.get("worker"),
                            "wall_s": t.user_attrs.get("wall_s"), "compile_s": t.user_attrs.get("compile_s"),
                            "cold_compiles": t.user_attrs.get("cold_compiles"),
                            "config": cfg.to_dict() if cfg else None})
    return StudyReport(study_name=study.study_name, grid_size=len(space.grid()),
                       best_config=_cfg_of(best, space) if best else None, best_ms=best.value if best else None,
                       best_trial=best.number if best else None,
                       fastest_ms=fastest.value if fastest is not best else None,
                       baseline_config=baseline, baseline_ms=base_ms,
                       complete=len(complete), failed=len(failed), rejected=len(rejected), skipped=len(skipped),
                       history=history)


def optimize(study: optuna.Study, space: SearchSpace, objective: Objective, *, n_trials: int,
             timeout: Optional[float] = None, trial_timeout: Optional[float] = None, grid: bool = False,
             baseline: Optional[KernelConfig] = None, seed: int = 0,
             callback: Optional[Callable[[dict], None]] = None, stale_after_s: Optional[float] = None,
             max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS, compiler: Optional[Compiler] = None,
             batch: Optional[int] = None) -> StudyReport:
    """Fill `study` until it holds `n_trials` evaluated trials (or the grid is done, or `timeout` passes).

    grid=True enqueues every valid config and runs the queue (n_trials is then the grid size).
    `baseline` (the heuristic config) is enqueued first when it is in the grid.
    `callback(event)` sees {'kind': 'trial'|'skip'|'compile'|'compiled'|'stop', ...} after each step
    (progress bars).
    compiler: compiles configs ahead of timing (module docstring): `batch` trials are asked, their
    configs compiled together, then timed one by one. batch None: the whole grid at once (grid=True
    with a compiler), else 1 (without a compiler each config compiles inside its own trial).
    """
    start = time.perf_counter()
    deadline = start + timeout if timeout else None
    grid_cfgs = space.grid()
    if not grid_cfgs:
        raise ValueError(f"the search space of {space.kernel} is empty: every config was pruned")
    if batch is None:
        # the whole grid first keeps every compile worker busy to the end (each batch boundary idles
        # some); a smaller batch keeps progress when a time limit may cut the run short
        batch = len(grid_cfgs) if grid and compiler is not None else 1
    if batch < 1:
        raise ValueError("batch must be >= 1")
    choices = {a: space.choices(a) for a in space.axes}
    valid = set(grid_cfgs)
    worker = _worker_id()
    rng = random.Random(seed * 1_000_003 + 17)
    notify = callback or (lambda event: None)
    if grid:
        n_trials = len(grid_cfgs)
    stale = stale_after_s if stale_after_s is not None else max(3 * (trial_timeout or 0), 3600)
    reap_stale(study, stale)
    objective.trusted_outputs()

    # the queue: the baseline first, then (grid) every config not yet present
    present = {c for t in study.get_trials(deepcopy=False) if (c := _queued_cfg(t, space)) is not None
               and (t.state == TrialState.WAITING or _ran(t))}
    queue = ([baseline] if baseline is not None and baseline in valid else []) + (grid_cfgs if grid else [])
    for cfg in queue:
        if cfg not in present:
            study.enqueue_trial(space.params(cfg), user_attrs={"enqueued": "grid" if grid else "baseline"})
            present.add(cfg)

    stats = {"compile_wall_s": 0.0, "timing_wall_s": 0.0, "compiled": 0, "compile_failed": 0,
             "compile_unknown": 0, "cold_compiles": 0}
    verdicts: dict[KernelConfig, CompileResult] = {}   # the compiler's word on each config, this call

    def precompile(cfgs: list) -> None:
        todo = [c for c in dict.fromkeys(cfgs) if c not in verdicts]
        if compiler is None or not todo:
            return
        left = None if deadline is None else max(0.0, deadline - time.perf_counter())
        notify({"kind": "compile", "n": len(todo)})
        t0 = time.perf_counter()
        try:
            got = compiler(todo, left)
        finally:
            stats["compile_wall_s"] += time.perf_counter() - t0
        for c in todo:
            v = got.get(c) or CompileResult("unknown")
            verdicts[c] = v
            key = {"ok": "compiled", "failed": "compile_failed", "unknown": "compile_unknown"}[v.status]
            stats[key] += 1
        notify({"kind": "compiled", "n": len(todo), "wall_s": time.perf_counter() - t0,
                "failed": sum(verdicts[c].status == "failed" for c in todo)})

    new_eval = new_fail = new_rej = 0
    mine = set()   # trials this call evaluated: the error outliers among them count as its rejections
    skips = 0
    held: list = []   # (trial, config): asked, not yet told; told FAIL "interrupted" if this call is stopped

    def fill() -> str:
        """Ask trials into `held` until the batch is full (""), or say why no more should be asked."""
        nonlocal skips
        while True:
            trials = study.get_trials(deepcopy=False)
            ran = [t for t in trials if _ran(t)]           # held trials are RUNNING: counted here
            ran_cfgs = {_cfg_of(t, space) for t in ran}
            if len(ran) >= n_trials:
                return "target reached"
            if len(ran_cfgs & valid) >= len(valid):
                return "space exhausted"
            if deadline is not None and time.perf_counter() >= deadline:
                return "timeout"
            waiting = [t for t in trials if t.state == TrialState.WAITING]
            if grid and not waiting:
                return "grid done"
            if len(held) >= batch:
                return ""
            if skips >= max_consecutive_skips and not waiting:
                untried = [c for c in grid_cfgs if c not in ran_cfgs]
                study.enqueue_trial(space.params(rng.choice(untried)), user_attrs={"enqueued": "fallback"})
                skips = 0
                continue

            trial = study.ask()
            held.append((trial, None))   # from here on, an interruption releases it
            params = {a: trial.suggest_categorical(a, choices[a]) for a in space.axes}
            cfg = space.config(params)
            trial.set_user_attr("worker", worker)
            if grid and "enqueued" not in trial.user_attrs:
                held.pop()
                study.tell(trial, state=TrialState.PRUNED)
                return "grid done"
            skip = "invalid" if cfg not in valid else _claim(study, space, trial, cfg)
            if skip:
                held.pop()
                trial.set_user_attr("skipped", skip)
                study.tell(trial, state=TrialState.PRUNED)
                skips += 1
                notify({"kind": "skip", "reason": skip, "config": cfg})
                continue
            skips = 0
            held[-1] = (trial, cfg)

    def run_one(trial, cfg: KernelConfig) -> dict:
        verdict = verdicts.get(cfg)
        if verdict is not None and verdict.status == "failed":
            # not timed: Triton does not cache failures, so building it again would cost a full compile
            return {"state": TrialState.FAIL, "reason": verdict.reason or "compile_error",
                    "error": (verdict.error or "")[:800], "compile_s": verdict.seconds, "precompiled": True}
        t0 = time.perf_counter()
        with count_cold_compiles() as cold:
            result = evaluate(objective, cfg, trial_timeout)
        stats["timing_wall_s"] += time.perf_counter() - t0
        if cold is not None:
            result["cold_compiles"] = cold[0]   # kernels this process compiled itself (0 after a precompile)
            stats["cold_compiles"] += cold[0]
        if verdict is not None and verdict.status == "ok":
            result["compile_s"] = verdict.seconds
            result["precompiled"] = True
        return result

    stop = ""
    try:
        while not stop:
            stop = fill()
            if not held:
                break
            precompile([cfg for _, cfg in held])
            while held:
                trial, cfg = held[0]
                if deadline is not None and time.perf_counter() >= deadline:
                    # out of time: the rest of the batch is released (retryable), not timed
                    for t, _ in held:
                        t.set_user_attr("reason", "deadline")
                        study.tell(t, state=TrialState.FAIL)
                    held.clear()
                    stop = "timeout"
                    break
                result = run_one(trial, cfg)
                state, value = result.pop("state"), result.pop("value", None)
                for k, v in result.items():
                    if v is not None:
                        trial.set_user_attr(k, v)
                number = trial.number
                mine.add(number)
                if state == TrialState.COMPLETE:
                    study.tell(trial, value)
                else:
                    study.tell(trial, state=TrialState.FAIL)
                held.pop(0)
                new_eval += 1
                new_rej += bool(result.get("rejected"))
                new_fail += state == TrialState.FAIL and not result.get("rejected")
                notify({"kind": "trial", "number": number, "config": cfg, "state": state.name, "time_ms": value,
                        **result})
                if result.get("reason") == "cuda_error":
                    raise TunerAbort(f"trial {number} ({cfg}) left the device unusable: {result.get('error')}; "
                                     "restart the process to resume the study")
    except BaseException:
        for t, _ in held:
            with contextlib.suppress(Exception):
                t.set_user_attr("reason", "interrupted")
                study.tell(t, state=TrialState.FAIL)
        raise
    report = summarize(study, space, baseline)
    outliers = {h["number"] for h in report.history if h["reason"] == "error_outlier"}
    report.new_evaluated, report.new_failed = new_eval, new_fail
    report.new_rejected = new_rej + len(outliers & mine)
    report.stop_reason = stop
    for k, v in stats.items():
        setattr(report, k, v)
    notify({"kind": "stop", "reason": stop})
    return report


@contextlib.contextmanager
def count_cold_compiles():
    """Yields [n]: kernels this process compiles (Triton cache misses) inside the block; None if unknown.

    Triton's compilation listener (triton >= 3.4) reports every compile with cache_hit; after a
    precompile every kernel of a trial should be a hit, so n > 0 shows a precompile that missed
    (its shape or environment did not match the timing run's). Never fires under the interpreter.
    """
    try:
        from triton import knobs

        previous = knobs.compilation.listener
    except Exception:  # an older Triton: no listener
        yield None
        return
    count = [0]

    def listener(**kw):
        if not kw.get("cache_hit", True):
            count[0] += 1
        if previous is not None:
            previous(**kw)

    knobs.compilation.listener = listener
    try:
        yield count
    finally:
        knobs.compilation.listener = previous


@contextlib.contextmanager
def quiet_optuna():
    """Optuna logs every trial at INFO; the tuner reports progress itself."""
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(old)
