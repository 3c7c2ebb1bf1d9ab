"""The tile configuration a compiled kernel runs with: what the tuner searches and caches.

Codegen never imports the tuner: ops receive a `ConfigLookup` from the front
door and ask it for a config per (kernel, shape); without one they use
`heuristic_config`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

STRATEGIES = ("fused", "two_pass", "paired")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    chunk: int = 64          # C: tokens per chunk (the state is materialized/carried per chunk)
    sub_chunk: int = 16      # c: rows per sub-chunk (per-key decays: stable factoring inside a chunk)
    BK: Optional[int] = None  # key tile; None = all of K (padded to a power of two)
    BV: int = 64             # value tile
    num_warps: int = 4
    num_stages: int = 2
    # fused: state on chip; two_pass: chunk states in HBM, chunks in parallel; paired: two-pass with the states
    # every 2 * chunk rows, each output program taking two chunk-row tiles (codegen/chunk.py)
    strategy: str = "fused"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class ShapeKey:
    """What a config is chosen for; the tuner buckets T and B*H coarsely."""

    kernel: str              # "chunk_fwd", "chunk_bwd", "recurrent_fwd", ...
    dtype: str               # "fp32" | "fp16" | "bf16"
    B: int
    T: int
    H: int
    K: int
    V: int


#: (mixer, ShapeKey) -> KernelConfig or None (then the heuristic applies)
ConfigLookup = Callable[[object, ShapeKey], Optional[KernelConfig]]


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


#: The fused forward runs one program per (value block, sequence, head), each walking its sequence's chunks
#: in order. With fewer programs than this (about one per SM of an H100), walking more than SHORT_WALK
#: chunks, the GPU idles while they walk: the two-pass forward then runs every chunk in parallel after the
#: states kernel, whose own tiles split the state finer (codegen.chunk.state_tiles). Measured at bf16,
#: K = V = 128 (strategy_bench-20261122-121409.json), fused against two-pass: B*H = 16, T = 32768 (32
#: programs): linear 5.50 / 0.61 ms, scalar decay 3.05 / 0.99; B*H = 64, T = 8192 (128 programs): linear
#: 0.43 against 0.54 with that shape's states tiles.
FEW_PROGRAMS = 128
SHORT_WALK = 16


def walks_idle(NH: int, T: int, V: int, BV: int = 64, chunk: int = 64) -> bool:
    """Whether a fused forward over NH sequence-heads of T tokens leaves the GPU idle: fewer than FEW_PROGRAMS
    programs (one a value block of BV, sequence and head), each walking more than SHORT_WALK chunks. The default
    tiles are the heuristic's for a decay that is not per key."""
    return NH * -(-V // BV) < FEW_PROGRAMS and -(-T // chunk) > SHORT_WALK


def fit_strategy(config: KernelConfig, kernel: str, NH: int, T: int, V: int) -> KernelConfig:
    """`config`, with the two-pass forward where its fused forward would leave the GPU idle: NH sequence-heads
    of T tokens each. For configs chosen without these sizes (heuristics, another bucket's tuned config)."""
    if kernel != "chunk_fwd" or config.strategy != "fused" or NH <= 0 or T <= 0:
        return config
    if not walks_idle(NH, T, V, config.BV, config.chunk):
        return config
    return dataclasses.replace(config, strategy="two_pass")


def heuristic_config(kernel: str, K: int, V: int, dtype: str = "bf16", interpret: bool = False,
                     decay: Optional[str] = None, NH: int = -1, T: int = -1) -> KernelConfig:
    """A safe default when no tuned config exists: small enough tiles for K, V up to 256.

    `decay` (the mixer's decay kind: none | constant | scalar | key; None when unknown) picks the chunk
    kernels' tiles, measured on the H100 at K = V = 128 bf16 (benchmarks/NOTES.md): a per-key decay's
    chunk holds more [chunk, K] fp32 tiles (cumulative decay, bisection factors), so it takes 32-row
    chunks, all of V in one program (the attention block computed once) and 8 warps; the other kinds are
    fastest with 64-row chunks and 64-wide value blocks. Unknown: the per-key tiles (safe for every kind;
    the others lose up to 1.5x). fp32 and fp16 inputs (whose dots run in tf32/fp32) keep the per-key tiles
    for every kind: the wider tiles were measured in bf16 only; the per-key ones passed the H100 check in fp32.
    NH (sequences x heads) and T (tokens per sequence), where known, choose the forward's strategy
    (`fit_strategy`).
    """
    config = _heuristic_tiles(kernel, K, V, dtype, interpret, decay)
    if interpret:
        return config
    if kernel in ("recurrent_fwd", "recurrent_bwd"):
        return fit_value_blocks(config, NH, V)
    config = fit_out_key_blocks(config, kernel, K, V, dtype, decay, NH, T)
    config = fit_per_key_warps(config, kernel, K, dtype, decay, NH, T, V)
    return fit_pairs(fit_strategy(config, kernel, NH, T, V), kernel, K, dtype, decay)


def fit_per_key_warps(config: KernelConfig, kernel: str, K: int, dtype: str, decay: Optional[str], NH: int, T: int,
                      V: int) -> KernelConfig:
    """A per-key decay's two-pass forward over few long sequences (walks_idle) in 4 warps instead of the B = 4
    grid's 8: the tuner's pick for gla, hgrn2, rwkv6 and metala alike at B = 1, T = 32768, H = 16, K = V = 128
    bf16 (32/128/4/3; 6 trials each, make_defaults-20261123-0853-h100-b1.log), 1.03x, 1.07x, 1.14x and 1.19x
    faster than the heuristic's 32/128/8/3 in the tune's timing."""
    if (kernel != "chunk_fwd" or decay != "key" or dtype != "bf16" or config.strategy != "two_pass"
            or config.BK is not None or next_pow2(K) > 128 or NH <= 0 or T <= 0 or not walks_idle(NH, T, V)):
        return config
    return dataclasses.replace(config, num_warps=4)


def paired_serves(decay: str, inclusive: bool, normalize: bool, bonus: bool, K: int) -> bool:
    """Whether the paired forward serves a mixer (the one rule for codegen.chunk.pairs_ok and the tuner's space):
    chunk_out_pairs_kernel keeps the two tiles' queries and attention blocks of all of K (up to 128) and handles
    a decay per row or none, inclusive mixers without a normalizer or a bonus."""
    return decay != "key" and inclusive and not normalize and not bonus and next_pow2(K) <= 128


def fit_pairs(config: KernelConfig, kernel: str, K: int, dtype: str, decay: Optional[str]) -> KernelConfig:
    """A two-pass forward with all of K <= 128 in bf16 and no per-key decay runs paired (states every 2 * chunk
    rows), in 64-row tiles, 64-wide value blocks, 4 warps, 1 stage. B = 1, T = 32768, H = 16, K = V = 128
    (keyblock_bench-20261123-075008, against the heuristic's two-pass 64/64/4/2): linear attention 0.491 ms
    against 0.545 (its walk 244 against 272 us, its outputs 249 against 267), scalar decay 0.601 against 0.674,
    mamba2 0.644 against 0.678. Other paired tiles were slower at all three (64/128/4/2: 0.524, 0.627, 0.695; 8
    warps 0.647-0.823). A mixer the paired kernel does not serve (a normalizer, a bonus, an exclusive one)
    runs the config two-pass."""
    if (kernel != "chunk_fwd" or config.strategy != "two_pass" or decay not in ("none", "scalar", "constant")
            or dtype != "bf16" or config.BK is not None or next_pow2(K) > 128):
        return config
    return dataclasses.replace(config, strategy="paired", chunk=64, BV=64, num_warps=4, num_stages=1)


#: The key block of fit_out_key_blocks (tuner.space.OUT_KEY_BLOCK searches the same)
OUT_KEY_BLOCK = 64


def fit_out_key_blocks(config: KernelConfig, kernel: str, K: int, V: int, dtype: str, decay: Optional[str],
                       NH: int, T: int) -> KernelConfig:
    """A scalar decay at K <= 128 with few sequence-heads: the two-pass forward in 64-key blocks (its
    states walk split into 64 x 64 programs that read the keys pass's decayed keys, its outputs in
    chunk_out_kernel) where the fused forward would run at most FEW_PROGRAMS programs and those 64 x 64
    walks still make FEW_PROGRAMS or more. B = 4, T = 8192, H = 16, K = V = 128 bf16 (NH = 64, the fused
    forward's 128 programs; keyblock_bench-20261122-211844): scalar decay 0.79 ms fused, 0.68 two-pass with
    all of K, 0.62 in key blocks; mamba2 1.14, 1.04 and 0.54. At NH = 16 (B = 1) the key blocks lost to all
    of K (0.80 / 0.70 and 0.73 / 0.67: the 64-key walk splits into too few programs), at NH = 256 the fused
    forward stays (scalar decay 0.47 against 0.57; mamba2 0.62 against 0.51, which the tuner finds). Not
    measured between NH = 16 and 64. A constant decay keeps its tiles: at B = 4, T = 4096 ten trials of the
    tuner from these found retnet's best at 0.50 ms, where its shipped fused 32-row config had taken 0.39,
    and transnormer's at 0.63 against 0.67 (make_defaults-20261122-2145-h100-k128-keyblocks.log)."""
    if (kernel != "chunk_fwd" or decay != "scalar" or dtype != "bf16" or config.BK is not None
            or next_pow2(K) != 2 * OUT_KEY_BLOCK or V < 64 or V % 64 or NH <= 0 or T <= 0):
        return config
    walk_programs = NH * -(-K // OUT_KEY_BLOCK) * -(-V // 64)
    if NH * -(-V // config.BV) > FEW_PROGRAMS or walk_programs < FEW_PROGRAMS or -(-T // config.chunk) <= SHORT_WALK:
        return config
    return KernelConfig(chunk=64, sub_chunk=16, BK=OUT_KEY_BLOCK, BV=min(next_pow2(V), 128), num_warps=4,
                        num_stages=3, strategy="two_pass")


def fit_value_blocks(config: KernelConfig, NH: int, V: int) -> KernelConfig:
    """A recurrent walk's `config` with value blocks narrow enough for FEW_PROGRAMS programs over NH
    sequence-heads (down to 32 wide): each program walks its whole sequence, so fewer leave SMs idle."""
    BV = config.BV
    while NH > 0 and BV > 32 and NH * -(-V // BV) < FEW_PROGRAMS:
        BV //= 2
    return config if BV == config.BV else dataclasses.replace(config, BV=BV)


def _heuristic_tiles(kernel: str, K: int, V: int, dtype: str, interpret: bool, decay: Optional[str]) -> KernelConfig:
    Kp, Vp = next_pow2(K), next_pow2(V)
    if interpret:  # the interpreter is slow per program and per op: few large tiles
        return KernelConfig(chunk=16, sub_chunk=8, BK=None, BV=min(Vp, 64), num_warps=4, num_stages=1)
    if kernel in ("chunk_fwd", "chunk_bwd") and Kp <= 128:
        # chunk 64 with BV 32 and 8 warps hit an unexplained illegal memory access once (NOTES.md): V >= 64 only
        # V a multiple of 64 only: at V = 96 (a masked second value block) these tiles were not checked
        # unpipelined on the H100 (the miss there, gpu_check-20261122-0925, was the pipelined backward below)
        if decay in ("none", "scalar", "constant") and dtype == "bf16" and V >= 64 and V % 64 == 0:
            if kernel == "chunk_bwd":
                # not pipelined: with num_stages 2 or 3 these tiles' backward is miscompiled on the H100
                # (Triton 3.6): mamba2's gradients 2.0e-2 and 2.4e-2 against 2.9e-3 for every other config of
                # the grid, up to 3.9e-2 (dA_log) alone (tune_grid_mamba2_bwd-, config_check-20261122-h100);
                # num_stages 1 is correct and as fast (1.746 ms against 1.740 ms)
                return KernelConfig(chunk=64, sub_chunk=16, BK=None, BV=64, num_warps=8, num_stages=1)
            return KernelConfig(chunk=64, sub_chunk=16, BK=None, BV=max(16, min(Vp, 64)), num_warps=4,
                                num_stages=2)
        if decay == "key" and dtype == "bf16" and kernel == "chunk_bwd" and Kp == 64 and Vp == 64:
            # the tuner's winner for gla, hgrn2 and rwkv6 alike at B = 8, T = 4096, H = 16, K = V = 64 (8
            # trials each, compare-tune-20261122-2200-h100-k64.log): 4 warps and 3 stages against the K = 128
            # tiles' 8 and 2, backward 1.20-1.29x faster, fwd+bwd gla 3.40 -> 2.73 ms, hgrn2 3.42 -> 2.79,
            # rwkv6 3.84 -> 3.31 (compare-20261122-215858 against -220406)
            return KernelConfig(chunk=32, sub_chunk=16, BK=None, BV=64, num_warps=4, num_stages=3)
        if decay == "key" and dtype == "bf16" and kernel == "chunk_fwd":
            # the grid at B=4, T=4096, H=16 (benchmarks/results/tune_grid-20261122-h100.json): materialized
            # chunk states and chunks in parallel, 1.18 ms, against 1.62 ms for the state kept on chip
            return KernelConfig(chunk=32, sub_chunk=16, BK=None, BV=max(16, min(Vp, 128)), num_warps=8,
                                num_stages=3, strategy="two_pass")
        return KernelConfig(chunk=32, sub_chunk=16, BK=None, BV=max(16, min(Vp, 128)), num_warps=8, num_stages=2)
    if kernel in ("chunk_fwd", "chunk_bwd") and dtype == "bf16" and decay is not None and V >= 64 and V % 64 == 0:
        # K > 128: the tuner's winners at B = 8, T = 4096, H = 16, K = V = 256 (10 trials each,
        # benchmarks/results/compare-tune-20261122-1500-h100-k256.log). Forward against the tiles below: linear
        # attention 1.69 -> 1.15 ms, scalar decay 3.17 -> 2.07, per-key decays 12.5 -> 4.5-5.2 (all of K in one
        # tile leaves the fused walk's state and the per-key factors spilling: the two-pass forward splits them).
        # Then key blocks (BK), keyblock_bench-20261122-183138/-183617/-184114 at the same shape: the states
        # walks split into 64- or 128-key programs that read the keys pass's decayed keys, forward gla 5.28 ->
        # 4.18 ms, rwkv6 4.61 -> 3.82, scalar decay 1.98 -> 1.72, mamba2 2.66 -> 1.69; and a per-key decay's
        # backward kernel in 64-key blocks with 4 warps (with all of K it spilled 1496 bytes a thread), fwd+bwd
        # gla 33.6 -> 24.7 ms, hgrn2 33.3 -> 24.7, rwkv6 33.1 -> 25.4; then one program per key block and
        # dv apart (keyblock_bench-20261122-190536, -191214): gla 32.4 -> 16.9 ms, hgrn2 32.0 -> 17.1, rwkv6
        # 32.1 -> 19.5; a decay per row with 64-row chunks in 64-key blocks (unpipelined, as below K = 128),
        # mamba2 11.3 -> 10.1, scalar decay 9.75 -> 8.80, and their peaks 5377 -> 4103 and 4385 -> 3111 MiB
        # (the chunk states halve). Then the two-pass forward's outputs in key blocks for a decay per row
        # (chunk_out_kernel; keyblock_bench-20261122-202516, -202602): 64-row chunks, 64-key blocks, 4 warps, 3
        # stages, forward scalar decay 1.72 -> 1.52 ms, mamba2 1.69 -> 1.38; and its backward with 128-wide value
        # blocks, backward kernel 3.99 -> 3.54 ms (scalar decay), 4.14 -> 3.65 (mamba2). 128-row chunks do not
        # fit in shared memory
        if kernel == "chunk_bwd":
            if decay == "key":
                # 128-key and 128-wide value blocks with 8 warps: gla's 8-trial tune (compare-tune-20261122-2054-
                # h100-gla-k256.log), then the same tiles for all three against 64-key, 64-wide, 4-warp ones
                # (keyblock_bench-20261122-221343): fwd+bwd gla 17.11 -> 16.69 ms, hgrn2 17.31 -> 17.19, rwkv6
                # 19.66 -> 19.16, peaks 0-2.5% lower
                return KernelConfig(chunk=32, sub_chunk=16, BK=128, BV=min(Vp, 128), num_warps=8, num_stages=1)
            if decay in ("scalar", "constant"):
                return KernelConfig(chunk=64, sub_chunk=16, BK=64, BV=min(Vp, 128), num_warps=8, num_stages=1)
            return KernelConfig(chunk=32, sub_chunk=16, BK=None, BV=64, num_warps=8, num_stages=2)
        if decay == "none":
            return KernelConfig(chunk=64, sub_chunk=16, BK=None, BV=min(Vp, 128), num_warps=8, num_stages=1)
        if decay == "key":
            return KernelConfig(chunk=32, sub_chunk=16, BK=128, BV=min(Vp, 128), num_warps=8, num_stages=2,
                                strategy="two_pass")
        return KernelConfig(chunk=64, sub_chunk=16, BK=64, BV=min(Vp, 128), num_warps=4, num_stages=3,
                            strategy="two_pass")
    if kernel in ("chunk_fwd", "chunk_bwd"):   # K > 128 in other dtypes, or the decay unknown: not measured
        return KernelConfig(chunk=32, sub_chunk=16, BK=None, BV=max(16, min(Vp, 64)), num_warps=8, num_stages=2)
    if kernel in ("recurrent_fwd", "recurrent_bwd") and Kp <= 128:
        # the recurrent walks of gla at B = 16, T = 2048, H = 16, K = V = 128, bf16, per-key factors computed
        # before the walk (recurrent_bench-20261122-164748): all of V (up to 128) in one program, 4 warps,
        # fwd 6.03 ms and fwd+bwd 43.5 ms at 1.74 GB peak. 64-wide blocks: 7.65 / 37.2 ms at 2.82 GB, over
        # fused_recurrent_gla's 2.3 GB, since the backward's sums over V take one fp32 [B*T, H, K] buffer per
        # value block; 32 wide 7.24 / 33.1 at 4.97 GB; 8 warps 10.8 / 71.2
        return KernelConfig(chunk=16, sub_chunk=8, BK=None, BV=max(16, min(Vp, 128)), num_warps=4, num_stages=1)
    chunk = 64 if Kp <= 128 else 32
    BV = min(Vp, 64 if Kp <= 128 else 32)
    return KernelConfig(chunk=chunk, sub_chunk=16, BK=None, BV=max(BV, 16), num_warps=4, num_stages=2)
