"""Kernel launches, and a call's kernels compiled ahead of it in parallel threads.

Every generated kernel is launched through `launch(kernel, grid)(*args)`, which
is `kernel[grid](*args)`, except inside `recording()`: there, on that thread
only, the launch is recorded and nothing runs.

Why: the first fwd+bwd of a mixer compiles its kernels one after another as
they are first launched, each a few seconds (gla: 12.5 s of compiling for its
first fwd+bwd on an H100, `first_call-20261122-212536`). Triton's compiler
spends that time in C++ passes and ptxas with Python's lock released, so the
kernels of one call compile in parallel threads. `compile_ahead(dry_run)` runs
the call once with its launches recorded (the host code between them runs, on
tensors whose contents do not matter), then compiles each recorded launch with
Triton's own `JITFunction.run(..., warmup=True)` (bind, specialize, compile,
store in the kernel's cache; no launch) and builds its launcher, one thread
per kernel. The real call then finds every kernel compiled. A kernel that
fails to compile here is left to the real call, which compiles it again and
raises as it would have without this step.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import os
import threading
import time
from typing import Any, Callable, Optional

_local = threading.local()

#: what the latest compile_ahead in this process did: launches recorded, kernels, errors, seconds (benchmarks
#: and tests read it; a failure here is not raised, the real call meets it again)
last_report: dict = {}

#: threads that compile ahead; 0 or 1 turns compiling ahead off
JOBS_ENV = "MIXFORGE_COMPILE_JOBS"
MAX_JOBS = 16


@dataclasses.dataclass
class Launch:
    """One recorded launch: what `kernel[grid](*args, **kwargs)` would have run."""

    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", "?")


def launch(kernel, grid) -> Callable:
    """`kernel[grid]`; inside `recording()` on this thread, a callable that records the launch instead."""
    launches = getattr(_local, "launches", None)
    if launches is None:
        return kernel[grid]
    return lambda *args, **kwargs: launches.append(Launch(kernel, grid, args, kwargs))


@contextlib.contextmanager
def recording():
    """Launches on this thread are recorded into the yielded list, not run (nesting is an error)."""
    if getattr(_local, "launches", None) is not None:
        raise RuntimeError("recording() is already active on this thread")
    _local.launches = []
    try:
        yield _local.launches
    finally:
        _local.launches = None


def interpreting() -> bool:
    """Whether the generated kernels run under Triton's interpreter (no compile step), as the generated module
    decides it (printer.HELPERS)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def usable_cpus() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_jobs() -> int:
    """Threads for compiling ahead: MIXFORGE_COMPILE_JOBS, else the usable CPU cores (at most MAX_JOBS)."""
    env = os.environ.get(JOBS_ENV, "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise ValueError(f"{JOBS_ENV} must be an integer number of threads, got {env!r}") from None
    return min(usable_cpus(), MAX_JOBS)


def triton_compile(item: Launch, device) -> None:
    """Compile one recorded launch into its kernel's cache and build its launcher (no launch).

    `run(..., warmup=True)` is what `kernel[grid](...)` does short of launching. Reading the compiled
    kernel's `run` loads it and builds its host launcher (a C extension compiled by the system's C
    compiler, seconds of its own), which the first real launch would otherwise do on the caller's thread.
    The thread takes the caller's device: Triton keys its kernel cache by the current device."""
    import torch

    with torch.cuda.device(device):
        compiled = item.kernel.run(*item.args, grid=item.grid, warmup=True, **item.kwargs)
        if compiled is not None:
            compiled.run   # noqa: B018 - the property loads the binary and builds the launcher


def compile_launches(launches: list[Launch], device=None, jobs: Optional[int] = None,
                     compile_one: Optional[Callable[[Launch, Any], None]] = None) -> dict[str, BaseException]:
    """Compile `launches` in up to `jobs` threads, one per kernel (a kernel's own launches in order, so a
    repeated specialization finds the first one's binary). Returns {kernel name: error} for the kernels
    that failed; their remaining launches are skipped (the real call compiles them). `compile_one`:
    triton_compile by default."""
    compile_one = compile_one or triton_compile
    groups: dict[int, list[Launch]] = {}
    for item in launches:
        groups.setdefault(id(item.kernel), []).append(item)
    errors: dict[str, BaseException] = {}

    def one_kernel(items: list[Launch]) -> None:
        for item in items:
            try:
                compile_one(item, device)
            except Exception as e:
                errors[item.name] = e
                return

    jobs = default_jobs() if jobs is None else jobs
    if not groups:
        return errors
    with cf.ThreadPoolExecutor(max_workers=max(1, min(jobs, len(groups))),
                               thread_name_prefix="mixforge-compile") as pool:
        for f in [pool.submit(one_kernel, items) for items in groups.values()]:
            f.result()
    return errors


def compile_ahead(dry_run: Callable[[], Any], device=None, jobs: Optional[int] = None,
                  compile_one: Optional[Callable[[Launch, Any], None]] = None) -> dict[str, BaseException]:
    """Run `dry_run` with its launches recorded, then compile them in parallel (module docstring).

    Returns the kernels that failed to compile ({name: error}); an error of the dry run itself (the real call
    will meet it again, and report it) gives {"dry run": error}. Nothing is compiled with jobs < 2."""
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 2:
        return {}
    t0 = time.perf_counter()
    try:
        with recording() as launches:
            dry_run()
    except Exception as e:
        errors = {"dry run": e}
        launches = []
    else:
        errors = compile_launches(launches, device, jobs, compile_one)
    last_report.clear()
    last_report.update(launches=len(launches), kernels=sorted({x.name for x in launches}), jobs=jobs,
                       errors={k: f"{type(e).__name__}: {e}"[:500] for k, e in errors.items()},
                       seconds=time.perf_counter() - t0)
    return errors


__all__ = ["Launch", "launch", "recording", "compile_launches", "compile_ahead", "default_jobs", "interpreting",
           "usable_cpus", "JOBS_ENV"]
