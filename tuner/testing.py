"""A synthetic objective: a deterministic cost model over configs, for tests and dry runs of the tuner's mechanics.

It stands in for a compiled kernel: `run(config, inputs)` returns fixed outputs
and a time from a smooth cost model with one optimum (plus deterministic
jitter), so a study behaves like a real one without a GPU. Configs can be made
to fail (raise like an out-of-resources compile) or to return wrong outputs.
Every config it runs is appended to `calls`.
"""
from __future__ import annotations

import hashlib
import math
import time
from typing import Callable, Iterable, Optional

import torch

from mixforge.codegen.config import KernelConfig

from .study import Objective


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
                 sleep: Callable[[KernelConfig], float] = lambda c: 0.0,
                 optimum: Optional[dict] = None, tolerance: float = 1e-3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        inputs = {"x": torch.randn(4, 8, generator=g)}
        self.calls: list[KernelConfig] = []
        self._fail, self._wrong, self._sleep, self._optimum = fail, wrong, sleep, optimum

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
            return (y, None), cost_model(cfg, self._optimum)

        super().__init__(inputs=inputs, run=run, trusted=lambda x: (x["x"].sum(0) * 2.0, None), tolerance=tolerance,
                         describe="synthetic cost model")


def matches(**fields) -> Callable[[KernelConfig], bool]:
    """A predicate on configs: every given field equal."""
    return lambda c: all(getattr(c, k) == v for k, v in fields.items())


def any_of(preds: Iterable[Callable[[KernelConfig], bool]]) -> Callable[[KernelConfig], bool]:
    preds = list(preds)
    return lambda c: any(p(c) for p in preds)
