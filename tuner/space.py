"""The search space of one kernel: axes, constraints, and a resource estimate that prunes before compiling.

Axes (KernelConfig fields): chunk, sub_chunk, BK, BV, num_warps, num_stages,
strategy. The chunk kernels ("chunk_fwd", "chunk_bwd") search all of them
that apply to the mixer; the recurrent kernels ("recurrent_fwd",
"recurrent_bwd", "step") only BV and num_warps, the other fields pinned to the
heuristic's values.

A config is *valid* when every constraint holds (`SearchSpace.check` returns
the reasons when not). Only valid configs reach compilation: the study samples
axis values, and a combination that is not in the valid grid is recorded as a
skipped trial without ever being built.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from typing import Any, Iterable, Optional

from mixforge.codegen.config import (OUT_KEY_BLOCK, STRATEGIES, KernelConfig, heuristic_config, next_pow2,
                                     paired_serves)

try:  # the chunk path's own validation; the tuner may import codegen
    from mixforge.codegen.chunk import check_config as _codegen_check
except ImportError:  # pragma: no cover - codegen without the chunk path
    _codegen_check = None

CHUNK_KERNELS = ("chunk_fwd", "chunk_bwd")
RECURRENT_KERNELS = ("recurrent_fwd", "recurrent_bwd", "step")
KERNELS = CHUNK_KERNELS + RECURRENT_KERNELS
DEFAULT_KERNELS = CHUNK_KERNELS
AXES = ("chunk", "sub_chunk", "BK", "BV", "num_warps", "num_stages", "strategy")

BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
#: the largest (padded) K kept in one tile without a key-block axis: from K = 256 whole-K tiles spill in the
#: backward (benchmarks/keyblock_bench.py)
MAX_WHOLE_K = 128


def out_key_blocks_below_whole_k(kernel: str, p: "Problem", Kp: int) -> bool:
    """Whether a forward at K padded to Kp <= MAX_WHOLE_K may take OUT_KEY_BLOCK-key blocks (two-pass only).

    Up to MAX_WHOLE_K the kernels keep all of K in one tile, with this one exception: the two-pass forward of
    a decay that is not per key may walk its outputs and its split states in 64-key blocks (chunk_out_kernel).
    At B = 4, T = 8192, H = 16, K = V = 128 that took mamba2's forward 1.14 -> 0.54 ms and a scalar decay's
    0.79 -> 0.62 (keyblock_bench-20261122-211844); at B = 1 and B = 16 it lost for some mixers and won for
    others, so the tuner searches it."""
    return kernel == "chunk_fwd" and p.decay in ("none", "scalar", "constant") and OUT_KEY_BLOCK < Kp <= MAX_WHOLE_K


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    """What one thread block may use. Defaults: NVIDIA H100 (sm_90)."""

    smem_per_block: int = 227 * 1024   # bytes, opt-in maximum per block
    regs_per_sm: int = 64 * 1024       # 32-bit registers per SM (one block must fit)
    regs_per_thread: int = 255
    min_dot: int = 16                  # tl.dot needs M, N, K >= 16 on GPUs
    spill_slack: float = 2.0           # prune when the estimate exceeds the register limit by this factor
    max_subchunks: int = 8             # chunk / sub_chunk: the templates unroll NS (NS^2 blocks in the backward)


H100 = DeviceLimits()
#: the interpreter has no resource limits, but pruning as on the target GPU keeps CPU runs representative
INTERPRETER = DeviceLimits(min_dot=1)


def device_limits(device=None) -> DeviceLimits:
    """Limits of the current CUDA device (Triton's driver properties), H100 values when unknown."""
    from .keys import interpret_mode

    try:
        import torch

        if interpret_mode():
            return INTERPRETER
        if not torch.cuda.is_available():  # planning for a GPU from a machine without one
            return H100
        import triton

        idx = torch.cuda.current_device() if device is None else torch.device(device).index or 0
        props = triton.runtime.driver.active.utils.get_device_properties(idx)
        return DeviceLimits(smem_per_block=int(props.get("max_shared_mem", H100.smem_per_block)),
                            regs_per_sm=int(props.get("max_num_regs", H100.regs_per_sm)))
    except Exception:
        return H100


# --------------------------------------------------------------------------- resource estimate

@dataclasses.dataclass(frozen=True)
class Problem:
    """The facts about a mixer and shape that the space depends on."""

    K: int
    V: int
    dtype: str = "bf16"
    decay: str = "key"         # Mixer.decay_kind: none | constant | scalar | key
    bonus: bool = False
    normalize: bool = False
    inclusive: bool = True

    @classmethod
    def of(cls, mixer, K: int, V: int, dtype: str) -> "Problem":
        return cls(K=int(K), V=int(V), dtype=dtype, decay=mixer.decay_kind, bonus=mixer.bonus is not None,
                   normalize=bool(mixer.normalize), inclusive=bool(mixer.inclusive))

    @property
    def pairs(self) -> bool:
        """Whether the paired forward serves it (codegen.config.paired_serves, as the chunked path asks)."""
        return paired_serves(self.decay, self.inclusive, self.normalize, self.bonus, self.K)


@dataclasses.dataclass(frozen=True)
class Resources:
    smem_bytes: int
    regs_per_thread: int


def estimate_resources(kernel: str, cfg: KernelConfig, p: Problem) -> Resources:
    """Shared memory and registers of the widest program a config launches, from templates/chunk*.jinja.

    Notation (the templates' constexprs): BT = chunk, BK = max(16, next_pow2(K))
    (the backward kernel's and, two-pass without a per-key decay, the forward
    output kernel's key block is config.BK where set), BV = the value tile, W = num_warps (32
    threads each), S = num_stages, e = bytes of a dot operand (DOT_DT: the
    input dtype, fp32 for fp32 inputs), e_in = bytes of an input element.
    "key" = per-key decay. sub_chunk is not used by the chunk kernels.

    Registers: Triton spreads each block tile over the 32*W threads, one
    register per fp32 element. The peak live set of each kernel, read off the
    templates (every chunk is handled as whole [BT, *] tiles):

    chunk_fwd_kernel (fwd_intra, fwd_vblock):
        state   b_S (fused) or the loaded S^(c) block   BK*BV
        chunk   q, k (+ B and a bisection level's E:    BT*BK * (4 key | 2)
                key; its R, qg, kg are short-lived)
                A (+ D, a scalar decay's factors), v, acc  BT*BT * (2 scalar | 1) + 2 * BT*BV
    chunk_bwd_kernel (one chunk, all value blocks; the backward's states and
    dstates kernels are lighter):
        chunk   q, k, dq, dk, dkS (+ B, E, qg, kg)      BT*BK * (9 key | 5)
                A, dA, D; do, v, dv                     3 * BT*BT + 3 * BT*BV
                S^(c), dS^(c+1) blocks                  2 * BK*BV
    A thread's count is peak / (32*W) + 32 (addresses, offsets, loop state).
    Above 255 Triton spills to local memory: slower, not an error; so only a
    clear excess (DeviceLimits.spill_slack) prunes. (Checked against ptxas'
    reports for K = V = 128 bf16: benchmarks/chunk_compile.py.)

    Shared memory: each tl.dot stages its operands in shared memory (Hopper's
    wgmma reads B, and A unless it comes from registers); dots that are not
    live together reuse the space, so the largest dot counts:
        fwd  max(BT*BK + BK*BV (qe @ S), BT*BT + BT*BV (A @ v), BK*BT + BT*BV (kd^T @ v), 2*BT*BK (q k^T)) * e
        bwd  max(BT*BV + BV*BK (do @ S^T), BT*BT + BT*BK (dA @ k), BT*BK + BK*BV (kd @ dS)) * e
    plus layout-conversion scratch (transposes, gathers, axis-0 scans): the
    largest converted fp32 tile, 4 * max(BT*BK, BT*BV), plus Triton's software
    pipeline: loads in the runtime loops kept for S - 1 stages ahead,
    (S - 1) * e_in * BT * (2*BK + BV) in the forward (BK + BV with a per-key
    decay: q, k and a feed elementwise decay math, which Triton's pipeliner
    leaves in registers), (S - 1) * e_in * (BT * (2*BK + 2*BV) + 2*BK*BV) in
    the backward's value-block loops.
    The limit is the per-block opt-in maximum (227 KB on H100).

    The recurrent kernels hold the state [BK, BV] fp32 (and dS in the
    backward) plus one row of q, k, v: registers BK*BV*(1|2) / (32 W) + 32,
    shared memory a few rows.
    """
    e_in = BYTES[p.dtype]
    e = e_in                     # DOT_DT follows the input dtype (tf32 precision for 16-bit, ieee for fp32)
    BK = max(16, next_pow2(p.K))
    W = 32 * cfg.num_warps
    BV = cfg.BV
    if kernel in RECURRENT_KERNELS:
        state = BK * BV * (2 if kernel == "recurrent_bwd" else 1)
        return Resources(smem_bytes=4 * (BK + BV) * 4, regs_per_thread=-(-(state + 4 * BK + 2 * BV) // W) + 32)
    BT, S = cfg.chunk, cfg.num_stages
    key = p.decay == "key"
    if kernel == "chunk_fwd":
        if cfg.BK and cfg.strategy == "two_pass" and not key:
            BK = min(cfg.BK, BK)    # the output kernel walks key blocks of BK (chunk.out_key_blocks)
        vec = p.decay in ("scalar", "constant")
        peak = BK * BV + BT * BK * (4 if key else 2) + BT * BT * (2 if vec else 1) + 2 * BT * BV
        dots = max(BT * BK + BK * BV, BT * BT + BT * BV, BK * BT + BT * BV, 2 * BT * BK)
        loads = BT * ((BK + BV) if key else (2 * BK + BV))
    else:
        BK = min(cfg.BK, BK) if cfg.BK else BK     # the backward kernel walks key blocks of BK
        peak = BT * BK * (9 if key else 5) + 3 * BT * BT + 3 * BT * BV + 2 * BK * BV
        dots = max(BT * BV + BV * BK, BT * BT + BT * BK, BT * BK + BK * BV)
        loads = BT * (2 * BK + 2 * BV) + 2 * BK * BV
    scratch = 4 * max(BT * BK, BT * BV)
    smem = dots * e + scratch + (S - 1) * e_in * loads
    return Resources(smem_bytes=smem, regs_per_thread=-(-peak // W) + 32)


# --------------------------------------------------------------------------- the space

def _pow2(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0


def default_axes(kernel: str, p: Problem, interpret: bool = False) -> dict[str, tuple]:
    """The values each axis may take, before constraints.

    GPU: chunks 32-128 (16-row chunks waste the tensor cores), value tiles
    16-128, 2-8 warps, 1-3 pipeline stages, and for the forward both
    strategies (the backward has one). BK (key blocks) where K > 128: all
    of K, 128 or 64 (the states walks, the backward kernel and, two-pass with
    no per-key decay, the forward's output kernel split it); at K <= 128 only
    the two-pass forward without a per-key decay, all of K or 64
    (out_key_blocks_below_whole_k); sub_chunk is not used by the chunk kernels (pinned).
    Interpreter: small tiles and few values (only the mechanics run there;
    num_warps/num_stages are not even passed to its launches).
    """
    Vp = next_pow2(p.V)
    if kernel in RECURRENT_KERNELS:
        bvs = (8, 16, 32) if interpret else (16, 32, 64, 128)
        return {"BV": tuple(b for b in bvs if b <= max(Vp, bvs[0])),
                "num_warps": (1, 2, 4) if interpret else (1, 2, 4, 8)}
    if interpret:
        axes = {"chunk": (8, 16), "BV": (8, 16),
                "num_warps": (2, 4), "num_stages": (1,), "strategy": ("fused", "two_pass")}
    else:
        axes = {"chunk": (32, 64, 128), "BV": (16, 32, 64, 128),
                "num_warps": (2, 4, 8), "num_stages": (1, 2, 3), "strategy": ("fused", "two_pass")}
    if kernel == "chunk_bwd":   # the backward's kernels are the same for every strategy
        del axes["strategy"]
    elif p.pairs:
        axes["strategy"] += ("paired",)
    if not interpret and next_pow2(p.K) > MAX_WHOLE_K:
        # key blocks: the states walks' key split, the backward kernel's and the two-pass output kernel's
        axes["BK"] = (None, 128, 64)
    elif not interpret and out_key_blocks_below_whole_k(kernel, p, next_pow2(p.K)):
        axes["BK"] = (None, OUT_KEY_BLOCK)
    axes["BV"] = tuple(b for b in axes["BV"] if b <= Vp) or (min(axes["BV"]),)
    if not interpret:
        # value blocks below 64 only where V is that small: chunk_bwd with BV = 32 hit an illegal memory
        # access on the H100 (Triton 3.6, B=16 T=2048 H=16 K=V=128; benchmarks/NOTES.md), which would
        # take the tuning process down with it
        axes["BV"] = tuple(b for b in axes["BV"] if b >= min(64, Vp)) or axes["BV"]
    return axes


@dataclasses.dataclass
class SearchSpace:
    kernel: str
    problem: Problem
    axes: dict[str, tuple]
    fixed: dict[str, Any]
    limits: DeviceLimits

    # ---- constraints
    def check(self, cfg: KernelConfig, estimate: bool = True) -> list[str]:
        """Why `cfg` is invalid for this kernel and problem; empty when it is valid.

        estimate=False: only the hard rules (what the kernels accept), not the resource
        estimate; the runtime lookup uses that for configs that were measured to work.
        """
        why = []
        p, L = self.problem, self.limits
        Kp, Vp = next_pow2(p.K), next_pow2(p.V)
        for name in ("chunk", "sub_chunk", "BV", "num_warps"):
            if not _pow2(getattr(cfg, name)):
                why.append(f"{name}={getattr(cfg, name)} is not a power of two")
        if cfg.BK is not None and not _pow2(cfg.BK):
            why.append(f"BK={cfg.BK} is not a power of two")
        if not isinstance(cfg.num_stages, int) or cfg.num_stages < 1:
            why.append(f"num_stages={cfg.num_stages} must be >= 1")
        if cfg.strategy not in STRATEGIES:
            why.append(f"unknown strategy {cfg.strategy!r}")
        if why:
            return why
        if cfg.BV > max(Vp, 16 if L.min_dot >= 16 else 1):
            why.append(f"BV={cfg.BV} > V padded ({Vp})")
        if cfg.BV < L.min_dot and self.kernel in CHUNK_KERNELS:
            why.append(f"BV={cfg.BV} < {L.min_dot} (tl.dot minimum)")
        if self.kernel in CHUNK_KERNELS:
            if cfg.sub_chunk > cfg.chunk or cfg.chunk % cfg.sub_chunk:
                why.append(f"chunk={cfg.chunk} is not a multiple of sub_chunk={cfg.sub_chunk}")
            elif cfg.chunk // cfg.sub_chunk > L.max_subchunks:
                why.append(f"chunk/sub_chunk={cfg.chunk // cfg.sub_chunk} sub-chunks > {L.max_subchunks} "
                           "(unrolled: compile time)")
            if cfg.chunk < L.min_dot or cfg.sub_chunk < L.min_dot:
                why.append(f"chunk/sub_chunk below {L.min_dot} (tl.dot minimum)")
            if cfg.BK is not None and cfg.BK < Kp and Kp <= MAX_WHOLE_K and not (
                    cfg.strategy == "two_pass" and cfg.BK >= OUT_KEY_BLOCK
                    and out_key_blocks_below_whole_k(self.kernel, p, Kp)):
                why.append(f"BK={cfg.BK} < K padded={Kp}: key blocks only for K > {MAX_WHOLE_K}, or of "
                           f"{OUT_KEY_BLOCK} in a two-pass forward without a per-key decay; elsewhere all of K "
                           f"fits one tile and the states kernels split the key by themselves "
                           f"(codegen.chunk.state_tiles, BK=None)")
            elif cfg.BK is not None and cfg.BK < L.min_dot:
                why.append(f"BK={cfg.BK} < {L.min_dot} (tl.dot minimum)")
            if not why and _codegen_check is not None:
                try:
                    _codegen_check(cfg, p.K, p.V, gpu=L.min_dot >= 16)
                except ValueError as e:
                    why.append(f"codegen rejects it: {e}")
        if not estimate or why:
            return why
        res = estimate_resources(self.kernel, cfg, p)
        if res.smem_bytes > L.smem_per_block:
            why.append(f"shared memory {res.smem_bytes / 1024:.0f} KB > {L.smem_per_block / 1024:.0f} KB")
        reg_cap = min(L.regs_per_thread, L.regs_per_sm // (32 * cfg.num_warps))
        if res.regs_per_thread > reg_cap * L.spill_slack:
            why.append(f"~{res.regs_per_thread} registers/thread > {reg_cap} (x{L.spill_slack} spill slack)")
        return why

    def is_valid(self, cfg: KernelConfig) -> bool:
        return not self.check(cfg)

    # ---- enumeration
    def config(self, params: dict) -> KernelConfig:
        """A KernelConfig from axis values (the study's trial params) and the pinned fields."""
        return KernelConfig(**{**self.fixed, **{a: params[a] for a in self.axes}})

    def params(self, cfg: KernelConfig) -> dict:
        return {a: getattr(cfg, a) for a in self.axes}

    def candidates(self) -> Iterable[KernelConfig]:
        names = list(self.axes)
        for values in itertools.product(*(self.axes[n] for n in names)):
            yield self.config(dict(zip(names, values)))

    def grid(self) -> list[KernelConfig]:
        """Every valid config, in a fixed order."""
        if not hasattr(self, "_grid"):
            self._grid = [c for c in self.candidates() if self.is_valid(c)]
        return self._grid

    def pruned(self) -> list[tuple[KernelConfig, list[str]]]:
        return [(c, w) for c in self.candidates() if (w := self.check(c))]

    def choices(self, axis: str) -> tuple:
        """The values of one axis that occur in the valid grid (the study's categorical choices)."""
        seen = {getattr(c, axis) for c in self.grid()}
        return tuple(v for v in self.axes[axis] if v in seen)

    def contains(self, cfg: KernelConfig) -> bool:
        return all(getattr(cfg, k) == v for k, v in self.fixed.items()) and cfg in set(self.grid())

    @property
    def hash(self) -> str:
        """Identifies the space (axes, pinned values, limits): a study only ever sees one space."""
        d = {"kernel": self.kernel, "problem": dataclasses.asdict(self.problem),
             "axes": {a: list(self.choices(a)) for a in self.axes}, "fixed": self.fixed,
             "limits": dataclasses.asdict(self.limits)}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def heuristic(self, interpret: bool = False, NH: int = -1, T: int = -1) -> KernelConfig:
        """The config the ops run without a tuned one; NH (sequences x heads) and T, where known, fit its
        forward strategy to the call as the ops do (`codegen.config.fit_strategy`)."""
        return _heuristic(self.kernel, self.problem, interpret, NH=NH, T=T)

    def __len__(self) -> int:
        return len(self.grid())


def _heuristic(kernel: str, p: Problem, interpret: bool, NH: int = -1, T: int = -1) -> KernelConfig:
    return heuristic_config(kernel, p.K, p.V, p.dtype, interpret=interpret, decay=p.decay, NH=NH, T=T)


def build_space(kernel: str, problem: Problem, *, limits: Optional[DeviceLimits] = None,
                interpret: Optional[bool] = None, axes: Optional[dict[str, tuple]] = None) -> SearchSpace:
    """The search space of `kernel` for `problem` on a device with `limits`."""
    from .keys import interpret_mode

    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    interpret = interpret_mode() if interpret is None else interpret
    limits = limits or device_limits()
    ax = dict(axes) if axes is not None else default_axes(kernel, problem, interpret)
    unknown = set(ax) - set(AXES)
    if unknown:
        raise ValueError(f"unknown axes {sorted(unknown)}")
    base = _heuristic(kernel, problem, interpret).to_dict()
    fixed = {k: v for k, v in base.items() if k not in ax}
    if kernel in CHUNK_KERNELS and "sub_chunk" not in ax and "chunk" in ax:
        # sub_chunk pinned by the caller's axes: keep it a divisor of every chunk
        if any(c % fixed["sub_chunk"] or c < fixed["sub_chunk"] for c in ax["chunk"]):
            fixed["sub_chunk"] = min(ax["chunk"])
    return SearchSpace(kernel=kernel, problem=problem, axes=ax, fixed=fixed, limits=limits)
