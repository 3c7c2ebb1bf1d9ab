"""Compile candidate configs in parallel worker processes, so the serial timing loop only hits Triton's cache.

Why: on an H100 one chunk-kernel config takes ~20 s (forward) to ~100 s
(backward) to compile, while timing it takes well under a second, and timing
must stay serial (one GPU). Compilation is CPU work whose result Triton keeps
on disk (TRITON_CACHE_DIR), keyed by the kernel source, its specialization and
its options, not by which process compiled it. So `jobs` processes that build
the same kernels with the same specialization fill that cache, and the timing
process then only loads binaries.

What a worker does, per config (`_compile_task`): it builds the tuner's own
objective (runner.make_objective: the same compiled ops, the config pinned the
same way, forward and, for *_bwd kernels, the backward through autograd) and
runs it once with every Triton launch turned into a compile-only
`JITFunction.run(..., warmup=True)`: each kernel the config needs is compiled
(or found in the cache) and nothing runs on the GPU, so a bad config cannot
poison a worker's CUDA context. The worker's inputs have a reduced shape
(`compile_shape`) that Triton specializes exactly like the real one, so 16
workers need a few MB of GPU memory each (plus their CUDA contexts), not the
GBs a backward at B=4, T=4096 allocates.

Multiprocessing: "spawn" (never fork a process that has touched CUDA); every
worker sees only the timing process's GPU (CUDA_VISIBLE_DEVICES set before it
touches CUDA) and the same TRITON_CACHE_DIR; workers empty the CUDA caching
allocator after each config, and the pool is closed when the kernel's study
ends. A worker also never autotunes (MIXFORGE_AUTOTUNE=0).

Results (study.CompileResult): "ok"; "failed" when Triton raised while
compiling (reason compile_error, or out_of_resources): the study records a FAIL
trial without timing it; "unknown" when the failure was not the compiler's (a
harness error, a worker that died, the time limit): the study times that config
as usual, compiling it inline.

CPU / Triton's interpreter: there is no compile step, so there is nothing to do
ahead: `make_precompiler` returns None and the study runs exactly as without it
(the CPU tests keep their mechanics; they exercise the batching with a stand-in
compiler, tuner.testing.FakeCompiler).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing as mp
import os
import time
import warnings
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Optional, Sequence

from mixforge.codegen.config import KernelConfig
from mixforge.codegen.launch import usable_cpus

from .study import CompileResult

#: what Triton specializes an integer kernel argument on (besides its value being a constexpr)
_DIVISOR = 16


def default_jobs() -> int:
    """Compile workers by default: every usable CPU core on a CUDA machine; 0 (no precompile) elsewhere."""
    from .keys import interpret_mode

    try:
        import torch

        if interpret_mode() or not torch.cuda.is_available():
            return 0
    except Exception:
        return 0
    return usable_cpus()


# --------------------------------------------------------------------------- the reduced shape

def _int_class(n: int) -> tuple:
    """How Triton's JIT specializes an int argument: == 1 (a constexpr), divisible by 16, 32-bit or not."""
    return (n == 1, n % _DIVISOR == 0, -2 ** 31 <= n < 2 ** 31)


def compile_shape(shape, max_chunk: int = 128):
    """A smaller (B, T), same H, K, V, whose launches Triton compiles exactly like `shape`'s.

    A kernel's binary depends on its constexprs (H, K, V, tiles, flags: kept), its
    dtypes, pointer alignment (torch allocations: always 16-byte aligned), and,
    per integer argument, on `_int_class`. The integers the chunk kernels take
    that depend on B and T are of the form T, B*T, B*ceil((T + s) / chunk)
    (chunk counts), B: with B' = B (mod 16), T' = T (mod 16 * max_chunk), and both
    large enough that none of them becomes 1, each keeps its class mod 16. So the
    reduction is only by whole periods of 16 * max_chunk tokens and 16
    sequences; a new kind of integer argument in codegen could still break it,
    which the study's cold_compiles count (kernels the timing loop compiled
    itself, 0 after a matching precompile) shows on the GPU.
    """
    from .runner import Shape

    shape = Shape.parse(shape)
    B, T, H, K, V = shape.astuple()
    period = _DIVISOR * max(1, int(max_chunk))
    # T' > max_chunk keeps every chunk count >= 2 (a count of 1 is a constexpr); B' >= 2 unless B is 1
    Ts = T if T <= max_chunk + period else max_chunk + 1 + (T - max_chunk - 1) % period
    Bs = B if B <= _DIVISOR + 1 else 2 + (B - 2) % _DIVISOR
    return Shape(Bs, Ts, H, K, V)


# --------------------------------------------------------------------------- the worker side

_W: dict = {}   # per worker process: the objective of the spec it last built


def _init_worker(env: dict) -> None:
    """Runs first in each spawned worker, before anything can touch CUDA: pin the GPU and the caches."""
    os.environ.update(env)


class _AtShape:
    """The base lookup asked at the timing run's B and T: a chunk_bwd objective runs its forward with
    the looked-up chunk_fwd config, which must be the one the timing process compiles, whatever the
    worker's reduced shape is."""

    def __init__(self, base, shape):
        self.base, self.B, self.T = base, shape.B, shape.T

    def __call__(self, mixer, sk):
        T = 1 if sk.kernel == "step" else self.T    # ops.step looks its kernel up at T = 1
        return self.base(mixer, dataclasses.replace(sk, B=self.B, T=T))


def _no_timing(fn) -> float:
    return 1.0


def _compile_only() -> None:
    """In this (worker) process: launches only compile, and compiler errors are told from the others.

    `kernel[grid](...)` becomes `JITFunction.run(..., warmup=True)`: it binds and specializes the
    real arguments, compiles (or loads from the cache) and returns before launching (triton 3.x).
    `triton.compiler.compile` (what every JITFunction's binder imports) is wrapped to remember its
    exception in `_W`: only an error raised there is the config's (compile_error); a driver, binding
    or harness error is not, whatever autograd or torch.library make of the exception on its way up.
    Under the interpreter there is no compile step (and a test runs the task in its own process).
    """
    import triton.compiler
    from triton.runtime.jit import JITFunction

    from .keys import interpret_mode

    if interpret_mode() or getattr(JITFunction, "_mixforge_compile_only", False):
        return
    real_compile = triton.compiler.compile

    def compile(src, *args, **kwargs):
        try:
            return real_compile(src, *args, **kwargs)
        except Exception as e:
            name = getattr(src, "name", None) or getattr(getattr(src, "fn", None), "__name__", "kernel")
            _W["compile_error"] = (name, e)
            raise

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=True, **kwargs)

    triton.compiler.compile = compile
    JITFunction.__getitem__ = __getitem__
    JITFunction._mixforge_compile_only = True


def _objective(spec: dict):
    key = (spec["mixer"], spec["kernel"], tuple(spec["shape"]), tuple(spec["compile_shape"]), spec["dtype"],
           spec.get("device", "cuda"))
    if _W.get("key") != key:
        from mixforge.spec import Mixer

        from .lookup import default_lookup
        from .runner import Shape, make_objective

        _compile_only()
        mixer = Mixer.from_json(spec["mixer"])
        full = Shape(*spec["shape"])
        _W["objective"] = make_objective(mixer, spec["kernel"], Shape(*spec["compile_shape"]), spec["dtype"],
                                         device=spec.get("device", "cuda"), timer=_no_timing, seed=spec["seed"],
                                         trusted="reference", base_lookup=_AtShape(default_lookup(), full))
        _W["key"] = key
    return _W["objective"]


def _compile_task(spec: dict, cfg: dict) -> dict:
    """Compile every kernel `cfg` needs (module docstring). Returns CompileResult's fields."""
    from .study import classify

    t0 = time.perf_counter()
    _W.pop("compile_error", None)
    try:
        obj = _objective(spec)
        obj.run(KernelConfig.from_dict(cfg), obj.inputs)
        return {"status": "ok", "seconds": time.perf_counter() - t0}
    except Exception as e:
        failed = _W.pop("compile_error", None)
        if failed is None:  # not raised by Triton's compiler: the harness's problem, not the config's
            return {"status": "unknown", "error": f"{type(e).__name__}: {e}"[:800],
                    "seconds": time.perf_counter() - t0}
        kernel, exc = failed
        reason = "out_of_resources" if classify(exc) == "out_of_resources" else "compile_error"
        return {"status": "failed", "reason": reason, "error": f"{kernel}: {type(exc).__name__}: {exc}"[:800],
                "seconds": time.perf_counter() - t0}
    finally:
        try:
            import torch

            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()   # hold only the CUDA context between configs
        except Exception:
            pass


# --------------------------------------------------------------------------- the pool

def _visible_device(device) -> Optional[str]:
    """The CUDA_VISIBLE_DEVICES entry of the timing process's GPU (workers see it alone, as cuda:0)."""
    import torch

    d = torch.device(device if device is not None else "cuda")
    idx = d.index if d.index is not None else torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return str(idx)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return ids[idx] if idx < len(ids) else None


class Precompiler:
    """A pool of `jobs` spawned processes compiling the configs of one (mixer, kernel, shape, dtype).

    `precompiler(configs, timeout)` -> {config: CompileResult}, the study's compiler protocol. The pool
    starts on the first call and stays up between calls (batches of one study: workers keep their
    imports and built ops, and hold only a CUDA context while idle); `close()` ends it.
    `callback(config, result)` sees each result as it arrives. `task` and `env` exist for tests: a
    module-level function (spec, config dict) -> CompileResult fields, and extra worker environment.
    """

    def __init__(self, mixer, kernel: str, shape, dtype: str, *, jobs: int, seed: int = 0, device=None,
                 max_chunk: int = 128, callback: Optional[Callable[[KernelConfig, CompileResult], None]] = None,
                 task: Callable[[dict, dict], dict] = _compile_task, env: Optional[dict] = None,
                 spec: Optional[dict] = None):
        from .keys import dtype_name
        from .runner import Shape

        if jobs < 1:
            raise ValueError("jobs must be >= 1")
        shape = Shape.parse(shape)
        self.jobs, self.callback, self.task = jobs, callback, task
        self.spec = spec if spec is not None else {
            "mixer": mixer.to_json(), "kernel": kernel, "shape": list(shape.astuple()),
            "compile_shape": list(compile_shape(shape, max_chunk).astuple()), "dtype": dtype_name(dtype),
            "seed": seed}
        self.env = {"MIXFORGE_AUTOTUNE": "0"}
        if env is None:
            visible = _visible_device(device)
            if visible is not None:
                self.env["CUDA_VISIBLE_DEVICES"] = visible
            if os.environ.get("TRITON_CACHE_DIR"):
                self.env["TRITON_CACHE_DIR"] = os.environ["TRITON_CACHE_DIR"]
        else:
            self.env.update(env)
        self._pool: Optional[cf.ProcessPoolExecutor] = None
        self._warned = False
        self.wall_s = 0.0
        self.results: dict[KernelConfig, CompileResult] = {}

    # ---- the pool
    def _executor(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(max_workers=self.jobs, mp_context=mp.get_context("spawn"),
                                                initializer=_init_worker, initargs=(self.env,))
        return self._pool

    def _kill(self) -> None:
        """Stop the workers now (a compile in flight cannot be cancelled otherwise before Python 3.14)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            self._kill()
        else:
            self.close()

    # ---- compiling
    def __call__(self, configs: Sequence[KernelConfig], timeout: Optional[float] = None
                 ) -> dict[KernelConfig, CompileResult]:
        todo = list(dict.fromkeys(configs))
        out: dict[KernelConfig, CompileResult] = {}
        if not todo:
            return out
        if timeout is not None and timeout <= 0:
            return {c: CompileResult("unknown", error="no time left to compile") for c in todo}
        t0 = time.perf_counter()
        pool = self._executor()
        futures = {pool.submit(self.task, self.spec, c.to_dict()): c for c in todo}
        broken = False
        try:
            for f in cf.as_completed(futures, timeout=timeout):
                cfg = futures[f]
                try:
                    res = CompileResult(**f.result())
                except BrokenProcessPool as e:
                    # a worker died (a crash in the compiler?); which config killed it is not known
                    broken = True
                    res = CompileResult("unknown", error=f"a compile worker died: {e}")
                except Exception as e:
                    res = CompileResult("unknown", error=f"{type(e).__name__}: {e}"[:800])
                self._record(out, cfg, res)
        except cf.TimeoutError:
            self._kill()  # out of time; the next call starts a fresh pool
            for cfg in todo:
                if cfg not in out:
                    self._record(out, cfg, CompileResult("unknown", error=f"not compiled within {timeout:.3g} s"))
        except BaseException:
            self._kill()
            raise
        if broken:
            self._kill()
        self.wall_s += time.perf_counter() - t0
        self._warn_if_broken(out)
        return out

    def _record(self, out: dict, cfg: KernelConfig, res: CompileResult) -> None:
        out[cfg] = self.results[cfg] = res
        if self.callback is not None:
            self.callback(cfg, res)

    def _warn_if_broken(self, out: dict) -> None:
        """A harness error in every worker would silently turn precompile into a slow no-op: say so, once."""
        errs = [r.error for r in out.values() if r.status == "unknown" and r.error]
        if errs and len(errs) == len(out) and not self._warned:
            self._warned = True
            warnings.warn(f"mixforge: precompile compiled nothing ({errs[0]}); the trials compile inline",
                          RuntimeWarning, stacklevel=3)


def make_precompiler(mixer, kernel: str, shape, dtype: str, *, jobs: Optional[int] = None, seed: int = 0,
                     device=None, max_chunk: int = 128, callback=None) -> Optional[Precompiler]:
    """The compiler `tune` hands to the study, or None where precompiling does not apply.

    None: on CPU / Triton's interpreter (nothing to compile), when the timing device is not a CUDA
    device, or with jobs <= 1 (one worker would compile as serially as the timing loop does).
    """
    import torch

    from .keys import interpret_mode

    jobs = default_jobs() if jobs is None else jobs
    if jobs <= 1 or interpret_mode() or not torch.cuda.is_available():
        return None
    if device is not None and torch.device(device).type != "cuda":
        return None
    return Precompiler(mixer, kernel, shape, dtype, jobs=jobs, seed=seed, device=device, max_chunk=max_chunk,
                       callback=callback)
