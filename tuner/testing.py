"""A synthetic objective: a deterministic cost model over configs, for tests and dry runs of the tuner's mechanics.

It stands in for a compiled kernel: `run(config, inputs)` returns fixed outputs
and a time from a smooth cost model with one optimum (plus deterministic
jitter), so a study behaves like a real one without a GPU. Configs can be made
to fail (raise like an out-of-resources compile) or to return wrong outputs.
Every config it runs is appended to `calls`.

`FakeCompiler` stands in for the parallel precompile (precompile.Precompiler)
in the study: it records the batches it is given and fails chosen configs like
a Triton compile error. `fake_compile_task` stands in for the worker's task
inside a real spawned pool (no Triton, no GPU).
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Callable, Iterable, Optional

import torch

from mixforge.codegen.config import KernelConfig

from .study import CompileResult, Objective


class OutOfResources(Exception):
    """Named like triton's, so the tuner classifies it as out_of_resources."""


def cost_model(cfg: KernelConfig, optimum: Optional[dict] = None) -> float:
    """Milliseconds: 1.0 at the optimum, growing with the log2 distance of each axis from it."""
    o = {"chunk": 64, "sub_chunk": 16, "BK": None, "BV": 64, "num_warps": 4, "num_stages": 2, "strategy": "fused"}
    o.update(optimum or {})
    ms = 1.0
    ms += 0.30 * abs(math.log2(cfg.chunk / o["chunk"]))
    ms += 0.10 * abs(math.log2(cfg.sub_chunk / o["sub_chunk"]))
    ms += 0.20 * abs(math.log2(cfg.BV / o["BV"]))
    ms += 0.15 * abs(math.log2(cfg.num_warps / o["num_warps"]))
    ms += 0.08 * abs(cfg.num_stages - o["num_stages"])
    ms += 0.12 * (cfg.strategy != o["strategy"]) + 0.07 * (cfg.BK != o["BK"])
    jitter = int(hashlib.sha256(repr(cfg).encode()).hexdigest()[:6], 16) / 0xFFFFFF
    return ms + 0.02 * jitter


class SyntheticObjective(Objective):
    def __init__(self, *, fail: Callable[[KernelConfig], bool] = lambda c: False,
                 wrong: Callable[[KernelConfig], bool] = lambda c: False,
                 sloppy: Callable[[KernelConfig], bool] = lambda c: False,
                 sleep: Callable[[KernelConfig], float] = lambda c: 0.0,
                 optimum: Optional[dict] = None, tolerance: float = 1e-3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        inputs = {"x": torch.randn(4, 8, generator=g)}
        self.calls: list[KernelConfig] = []
        self._fail, self._wrong, self._sloppy, self._sleep, self._optimum = fail, wrong, sloppy, sleep, optimum

        def run(cfg: KernelConfig, x):
            self.calls.append(cfg)
            if self._fail(cfg):
                raise OutOfResources(f"out of resource: shared memory, Required: 300000, Hardware limit: 232448 ({cfg})")
            pause = self._sleep(cfg)
            if pause:
                time.sleep(pause)
            y = x["x"].sum(0) * 2.0
            if self._wrong(cfg):
                y = y + 1.0  # a miscompile
            if self._sloppy(cfg):
                y = y * (1 + 0.3 * tolerance)  # a miscompile the tolerance lets through
            return (y, None), cost_model(cfg, self._optimum)

        super().__init__(inputs=inputs, run=run, trusted=lambda x: (x["x"].sum(0) * 2.0, None), tolerance=tolerance,
                         describe="synthetic cost model")


#: a small chunk_fwd space (32 configs) for mechanics tests, and its fastest config under `cost_model`
SMALL_AXES = {"chunk": (32, 64), "sub_chunk": (16, 32), "BV": (32, 64), "num_warps": (4, 8),
              "strategy": ("fused", "two_pass")}
OPTIMUM = dict(chunk=64, sub_chunk=16, BV=64, num_warps=4, strategy="fused")


def small_space():
    from .space import H100, Problem, build_space

    return build_space("chunk_fwd", Problem(K=64, V=64, dtype="bf16", decay="scalar"), limits=H100,
                       interpret=False, axes=SMALL_AXES)


def matches(**fields) -> Callable[[KernelConfig], bool]:
    """A predicate on configs: every given field equal."""
    return lambda c: all(getattr(c, k) == v for k, v in fields.items())


def any_of(preds: Iterable[Callable[[KernelConfig], bool]]) -> Callable[[KernelConfig], bool]:
    preds = list(preds)
    return lambda c: any(p(c) for p in preds)


class FakeCompiler:
    """A study compiler: `fail(config)` configs do not compile (reason compile_error), `unknown(config)`
    ones are left out of the answer (not judged), the rest compile. `batches` lists every call's configs;
    `events`, when given, gets ("compile", config) appended, to check the order against the runs."""

    def __init__(self, fail: Callable[[KernelConfig], bool] = lambda c: False,
                 unknown: Callable[[KernelConfig], bool] = lambda c: False, seconds: float = 2.5,
                 sleep: float = 0.0, events: Optional[list] = None):
        self.fail, self.unknown, self.seconds, self.sleep, self.events = fail, unknown, seconds, sleep, events
        self.batches: list[list[KernelConfig]] = []
        self.timeouts: list = []
        self.closed = False

    def __call__(self, configs, timeout=None) -> dict:
        self.batches.append(list(configs))
        self.timeouts.append(timeout)
        if self.sleep:
            time.sleep(self.sleep)
        out = {}
        for c in configs:
            if self.events is not None:
                self.events.append(("compile", c))
            if self.unknown(c):
                continue
            if self.fail(c):
                out[c] = CompileResult("failed", "compile_error", f"CompilationError: at 41:8: cannot lower ({c})",
                                       self.seconds)
            else:
                out[c] = CompileResult("ok", seconds=self.seconds)
        return out

    @property
    def compiled(self) -> list[KernelConfig]:
        return [c for b in self.batches for c in b]

    def close(self) -> None:
        self.closed = True


def fake_compile_task(spec: dict, cfg: dict) -> dict:
    """precompile._compile_task's stand-in in a spawned worker. spec lists config dicts that "fail"
    (a compile error naming the worker's CUDA_VISIBLE_DEVICES), "raise" (a harness error), "crash" (the
    worker dies), "hang", and "real" ones that go to the real task with spec["real_spec"] (on the CPU:
    the objective is built and run under the interpreter); others compile after spec["sleep"] seconds."""
    t0 = time.perf_counter()
    if cfg in spec.get("real", []):
        from .precompile import _compile_task

        return _compile_task(spec["real_spec"], cfg)
    if cfg in spec.get("crash", []):
        os._exit(3)
    if cfg in spec.get("hang", []):
        time.sleep(3600)
    if cfg in spec.get("raise", []):
        raise RuntimeError("the harness broke")
    time.sleep(spec.get("sleep", 0.0))
    if cfg in spec.get("fail", []):
        return {"status": "failed", "reason": "compile_error", "seconds": time.perf_counter() - t0,
                "error": f"CompilationError in pid {os.getpid()} "
                         f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}"}
    return {"status": "ok", "seconds": time.perf_counter() - t0}
