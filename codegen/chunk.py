"""The chunked-parallel path: launches the kernels of templates/chunk.py.jinja.

    forward(ctx, config) -> CoreForward
    backward(ctx, config, do, dS_T, dz_T) -> FeatureGrads

The math is ALGORITHMS.md §3-4. Every chunk is one set of whole-chunk tiles
([chunk, K], [chunk, V-block]): the maps and the cumulative log-decay are
computed once per chunk, and a per-key decay's intra-chunk attention is
factored by bisection (log2(chunk) masked tl.dot's, each with its own stable
reference row), so nothing is unrolled and compile times stay short.

Forward, three strategies (config.strategy):

* fused:    one program per (V-block, sequence, head) walks the chunks of its
            sequence in order with the state in registers.
* two_pass: the states kernel writes every chunk's start state S^(c) to HBM,
            then one program per (chunk, head) computes its chunk for every
            V-block (the attention block once), all chunks in parallel.
* paired:   two-pass with the states every 2 * chunk rows; one program per
            (state chunk, head) computes both of its chunk-row tiles for
            every V-block: the walk has half the steps and half the states
            to write, the output kernel reads half the states, and its
            tiles stay chunk rows (chunk_out_pairs_kernel). For a decay per
            row or none, inclusive, without normalizer or bonus, K <= 128
            (`pairs_ok`); other mixers run such a config two-pass.

Backward (the same for every strategy): the states kernel writes S^(c), the
dstates kernel walks each sequence backwards writing dS^(c+1), and one program
per (chunk, head) computes dq, dk, dv and dfa of its chunk for all V-blocks:
no partial sums over V-blocks, no separate cumulative-sum pass (the decay
gradient arriving from later positions is rowsum(dS^(c+1) * S^(c+1)), with
S^(c+1) rebuilt in the program from S^(c)). States live in HBM in the dot operand dtype (bf16/fp16
inputs: 16-bit, fp32 inputs: fp32).

The two states kernels walk each sequence serially, so their parallelism is
their number of programs, one per (K-block, V-block, sequence, head): they
split the state by their own tiles (`state_tiles`), finer when there are few
sequences and heads (B = 1, T = 32768 has 16 heads: 32 programs with the
main kernels' tiles, on 132 SMs).

Key blocks: config.BK None keeps all of K (padded to a power of two >= 16) in
one tile in every kernel, and lets the states kernels pick their own split. A
power of two below that is the states kernels' key tile and the backward
kernel's key block: one program per (chunk, head, key block) of the NK =
cdiv(K, BK) computes dq, dk and the decay gradient of its keys (whole-K tiles
spill there from K = 256) and leaves its share of the attention block and its
decayed keys in HBM, from which chunk_dv_kernel computes dv. The two-pass
forward's outputs then come from chunk_out_kernel, one program per (V-block,
chunk, head) summing the attention block and q @ S^(c) over the key blocks
(not for per-key decays: `out_key_blocks`); the fused forward keeps all of K.

Valid configs (`check_config`): chunk and BV powers of two; BK None or a power
of two; on the GPU chunk, BV, BK >= 16 (tl.dot's minimum). `sub_chunk` is not used by these kernels (kept valid: a power of two
dividing chunk, >= 16 on the GPU, so that stored configs stay readable).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import torch

from .config import STRATEGIES, KernelConfig, next_pow2, paired_serves
from .launch import launch


@dataclasses.dataclass
class ChunkCall:
    """Everything the launches need; built from a CallContext (or directly by the tests)."""

    module: Any
    map_args: list                      # values for the `maps.args()` hole
    B: int
    T: int
    H: int
    K: int
    V: int
    N: int
    scale: float
    decay: str                          # none | constant | scalar | key
    inclusive: bool
    normalize: bool
    bonus: bool
    cu_seqlens: Optional[torch.Tensor]  # int32 [N + 1] or None
    S0: Optional[torch.Tensor]
    z0: Optional[torch.Tensor]
    output_final_state: bool
    dtype: torch.dtype
    device: torch.device
    # o of the forward: fp32 when an epilogue (gate, norm) reads it, else the inputs' dtype, stored by the
    # kernel directly (CoreForward.o then is y: no fp32 o in HBM, no copy)
    o_dtype: torch.dtype = torch.float32
    # dfq, dfk, dfv: the inputs' dtype for a feature that is an input as-is (plan.passthrough: that is the
    # input's gradient, stored by the backward kernel directly), else fp32 for the chain rule
    dfeature_dtypes: tuple = (torch.float32, torch.float32, torch.float32)
    # KernelPlan.row_maps: fq or fk reads a per-row scalar input (mamba2's dt), which the walks' maps then cost
    row_maps: bool = True

    @classmethod
    def from_ctx(cls, ctx) -> "ChunkCall":
        sh, plan = ctx.shapes, ctx.plan
        cu = ctx.cu_seqlens
        if cu is not None and cu.dtype != torch.int32:
            cu = cu.to(torch.int32)
        return cls(ctx.module, ctx.kernel_args(), sh.B, sh.T, sh.H, sh.K, sh.V, sh.N, float(ctx.scale),
                   plan.decay, plan.inclusive, plan.normalize, plan.bonus, cu, ctx.S0, ctx.z0,
                   ctx.output_final_state, sh.dtype, sh.device,
                   o_dtype=torch.float32 if plan.has_epilogue else sh.dtype,
                   dfeature_dtypes=tuple(sh.dtype if f in plan.passthrough else torch.float32
                                         for f in ("fq", "fk", "fv")),
                   row_maps=plan.row_maps)


def check_config(config: KernelConfig, K: int, V: int, gpu: bool = True) -> None:
    """Raise ValueError for a config the chunked kernels cannot run."""
    C, c = config.chunk, config.sub_chunk
    pow2 = lambda n: n >= 1 and (n & (n - 1)) == 0  # noqa: E731
    if config.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {config.strategy!r}")
    if not (pow2(C) and pow2(c) and pow2(config.BV)):
        raise ValueError(f"chunk ({C}), sub_chunk ({c}) and BV ({config.BV}) must be powers of two")
    if C % c:
        raise ValueError(f"chunk ({C}) must be a multiple of sub_chunk ({c})")
    if config.BK is not None and not pow2(config.BK):
        raise ValueError(f"BK ({config.BK}) must be a power of two or None (the states kernels choose)")
    if gpu and (C < 16 or c < 16 or config.BV < 16 or (config.BK or 16) < 16):
        raise ValueError(f"chunk ({C}), sub_chunk ({c}), BV ({config.BV}) and BK ({config.BK}) must be >= 16 "
                         f"for tl.dot on the GPU")


#: The states kernels' programs each walk a whole sequence, so their number is their parallelism. With the
#: main kernels' tiles (all of K, their BV) and launch there are B*H*V/BV of them, enough from half an SM
#: count up (B = 16, T = 2048: 512). Below that (B = 1, T = 32768, H = 16: 32 programs) the state is split:
#: keys first (a value split repeats each program's per-key work, the decay's cumulative sum and
#: exponentials: gla's states kernel at B = 16 went 0.57 -> 0.78 ms from 128 to 64 values a program), at
#: most MAX_STATE_TILE elements a program, until there is one program per SM, down to MIN_STATE_TILE keys
#: and values, with 4 warps and 3 stages (SPLIT_LAUNCH: the next chunk's loads overlap this one's: linear
#: 0.53 -> 0.34 ms, gla 2.86 -> 1.95 at B = 1). Measured on the H100 (strategy_bench-20261122-120722.json, the sweep of
#: the states kernel alone; compare-20261122-122907.json): splitting where there were already 128 programs
#: (K = V = 64 at B*H = 128) or whole [256, 256] states made the backward slower.
MIN_STATE_TILE = 32
MAX_STATE_TILE = 128 * 128
SPLIT_LAUNCH = (4, 3)      # num_warps, num_stages of split states
#: ... of a mixer without a decay in tiles of at most DEEP_SPLIT_TILE: its walks' step is two tile loads and a
#: dot, and a fourth stage hides more of the loads. Linear attention at B = 1, T = 32768 (32 x 32 tiles): states
#: walk 343 -> 276 us, forward 0.633 -> 0.568 ms, backward 1.688 -> 1.618. With a decay on the step's path it
#: gained nothing (scalar decay 387 -> 396 us, mamba2 388 -> 386, gla 862 -> 863; strategy_bench-20261123-020442,
#: -020545, -020631). In the backward's 32 x 128 tiles at B = 4 it lost: 1.530 -> 1.620 ms (-022344, -022414).
SPLIT_LAUNCH_NO_DECAY = (4, 4)
DEEP_SPLIT_TILE = 32 * 32
#: num_warps, num_stages of the walks that are not split; None: the launch of the config they serve
WALK_LAUNCH: Optional[tuple[int, int]] = None


def state_tiles(K: int, V: int, NH: int, BK: Optional[int], BV: int, n_sm: int) -> tuple[int, int, bool]:
    """(BK, BV, split) of the states kernels for NH sequence-heads, given the main kernels' BV. A config's
    BK fixes the key tile of a split state."""
    kp, vp = max(16, next_pow2(K)), max(16, next_pow2(V))
    programs = lambda bk, bv: -(-K // bk) * -(-V // bv) * NH  # noqa: E731
    if BK is None and 2 * programs(kp, BV) >= n_sm:
        return kp, BV, False
    bk, bv = (min(BK, kp) if BK is not None else kp), vp
    while bk * bv > MAX_STATE_TILE or programs(bk, bv) < n_sm:
        if BK is None and bk > MIN_STATE_TILE:
            bk //= 2
        elif bv > MIN_STATE_TILE:
            bv //= 2
        else:
            break
    return bk, bv, True


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; the interpreter decides as on an H100 (132)."""
    if device.type != "cuda":
        return 132
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# --------------------------------------------------------------------------- helpers

def _dot_types(dtype: torch.dtype):
    import triton.language as tl

    if dtype == torch.float16:
        # fp16's range ends at 6e-8: decay-scaled operands (exp(B) under strong decays) and state
        # gradients underflow to zero. tf32 keeps fp16's mantissa with fp32's range.
        return tl.float32, "tf32"
    if dtype == torch.bfloat16:
        return tl.bfloat16, "tf32"
    return tl.float32, "ieee"


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Chunk states in HBM: the dot operand dtype (they only ever enter tl.dot as that): bf16 or fp32."""
    return dtype if dtype == torch.bfloat16 else torch.float32


@dataclasses.dataclass
class _Geom:
    BT: int
    BK: int                             # all of K, padded: the forward kernels' key tile
    KB: int                             # the backward kernel's key block (config.BK), NK of them
    NK: int
    BV: int
    NV: int
    SBK: int                            # the states kernels' tiles and launch (state_tiles)
    SBV: int
    LOG2_BT: int
    NC_total: int                       # chunks over all sequences
    coff: Optional[torch.Tensor]        # int32 [N + 1] first global chunk of each sequence (varlen)
    cseq: Optional[torch.Tensor]        # int32 [NC_total] the sequence of each chunk (varlen)
    dot_dt: Any
    prec: str
    num_warps: int
    num_stages: int
    s_warps: int
    s_stages: int
    pre: bool                           # the states walk reads chunk_keys_kernel's decayed keys (walk_keys)
    fact: bool = False                  # ... or (the forward) only its decay factors, computing the maps

    def state_blocks(self, K: int, V: int) -> int:
        """The states kernels' (K-block, V-block) programs per sequence-head."""
        return -(-K // self.SBK) * -(-V // self.SBV)


def _geometry(c: ChunkCall, config: KernelConfig, backward: bool = False) -> _Geom:
    check_config(config, c.K, c.V, gpu=c.device.type == "cuda")
    BT = config.chunk
    BK = max(16, next_pow2(c.K))
    KB = min(config.BK, BK) if config.BK is not None else BK
    BV = max(16, min(config.BV, next_pow2(c.V))) if c.device.type == "cuda" else min(config.BV, next_pow2(c.V))
    NV = -(-c.V // BV)
    shift = 0 if c.inclusive else 1   # exclusive mixers walk T + 1 positions (k, v, fa one token later)
    if c.cu_seqlens is None:
        NC_total, coff, cseq = c.B * (-(-(c.T + shift) // BT)), None, None
    else:
        lens = (c.cu_seqlens[1:] - c.cu_seqlens[:-1]).long() + shift
        nc = (lens + BT - 1) // BT
        coff = torch.zeros(c.N + 1, dtype=torch.int32, device=c.device)
        coff[1:] = torch.cumsum(nc, 0).to(torch.int32)
        NC_total = int(coff[-1].item())
        cseq = torch.repeat_interleave(torch.arange(c.N, device=c.device, dtype=torch.int32), nc)
    dot_dt, prec = _dot_types(c.dtype)
    SBK, SBV, split = state_tiles(c.K, c.V, c.N * c.H, config.BK, BV, sm_count(c.device))
    deep = c.decay == "none" and SBK * SBV <= DEEP_SPLIT_TILE
    split_launch = SPLIT_LAUNCH_NO_DECAY if deep else SPLIT_LAUNCH
    s_warps, s_stages = split_launch if split else (WALK_LAUNCH or (config.num_warps, config.num_stages))
    keys_pass = walk_keys(c, split, BT, SBK, SBV)
    fact = keys_pass and not backward and walk_factors(c, SBK, SBV)
    return _Geom(BT, BK, KB, -(-c.K // KB), BV, NV, SBK, SBV, BT.bit_length() - 1, NC_total, coff, cseq, dot_dt, prec,
                 config.num_warps, config.num_stages, s_warps, s_stages, keys_pass and not fact, fact)


#: a decay per row or a constant one skips the keys pass on walks of at most this many chunks a sequence in
#: state tiles of at most KEYS_PASS_TILE elements
KEYS_PASS_WALK = 128
KEYS_PASS_TILE = 64 * 64


def walk_keys(c: ChunkCall, split: bool, BT: int, SBK: int, SBV: int) -> bool:
    """Whether the states walk reads its decayed keys and chunk decays from chunk_keys_kernel (run first,
    one program per chunk) instead of computing them at every step; in the backward, the dstates walk its
    q * exp(B) and chunk decays too. Where the state is split (few long
    sequences), the walk's time is the latency of its steps, and each waited on the chunk's maps,
    cumulative log-decay and exponentials before its dot: gla's states kernel took 1.97 ms for 512 chunks
    at B = 1, linear attention's (no decay math) 0.34 (strategy_bench-20261122-122520). The walk then
    reads a [BT, BK] 16-bit tile of decayed keys instead of k and the decay input. Not for normalize
    mixers, whose z sums the keys in fp32.

    A decay per row or a constant one, on a walk of at most KEYS_PASS_WALK chunks in SBK x SBV state tiles of
    at most KEYS_PASS_TILE: no keys pass. Since the walks load their per-row inputs a chunk ahead, the pass no
    longer paid there (keyblock_bench-20261122-233950 and -234050, the forward at B = 4, T = 8192,
    K = V = 128 in 64-key blocks, 64 x 64 tiles, 128 chunks: scalar decay 0.612 -> 0.531 ms, its walk 229 ->
    234 us without the 88 us pass; mamba2's walk 227 -> 262 us without the 65 us pass). It still did:
    * on 512 chunks (B = 1, T = 32768; -234010, -234117, -234030, -234143): scalar decay 0.696 against
      0.825 ms, mamba2 0.650 against 0.858; fwd+bwd 2.75 against 3.02 and 3.09 against 3.54;
    * in 64 x 256 tiles (B = 8, T = 4096, K = V = 256 in 64-key blocks, 64 chunks; -201936 against -235450):
      the walk took 596 us and the pass 176 with it, 975 without (scalar decay); the forward 1.60 against 1.72
      ms, mamba2's 1.47 against 1.66, its fwd+bwd 8.63 (compare-20261122-221937) against 9.50 (-235521)."""
    if not (split and c.decay != "none" and not c.normalize):
        return False
    if c.decay == "key":
        return True
    steps = -(-(c.T + (0 if c.inclusive else 1)) // BT) if c.cu_seqlens is None else -(-c.T // (c.N * BT))
    return steps > KEYS_PASS_WALK or SBK * SBV > KEYS_PASS_TILE


def walk_factors(c: ChunkCall, SBK: int, SBV: int) -> bool:
    """Where the forward's states walk reads a pass (walk_keys): whether the pass writes only the rows' decay
    factors, exp(B_last - B) (fp32, BT a chunk and head), and the walk computes the maps itself (FACT). At B = 1
    the walk's time was its decay math, not its loads: scalar decay's walk without the keys pass took 537 us,
    328 with its cumulative sum, exponentials and state decay taken out (ablate-20261123-000124), 316 reading
    the keys pass, which moves 268 MB (k in, decayed k out) where the factors are 2 MB. Measured with the
    factors (keyblock_bench-20261123-004224 against -004355, B = 1, T = 32768, K = V = 128, 32 x 32 walks): the
    forward 0.698 -> 0.672 ms, the walk 316 -> 372 us and the pass 87 -> 8. Not taken:
    * in the backward, whose keys pass serves the dstates walk too: fwd+bwd 2.671 -> 2.693 (-004410, -004244);
    * in state tiles over KEYS_PASS_TILE: at K = V = 256 (64 x 256 walks) the forward 1.519 -> 1.601 ms
      (-004427, -004304), the walk 596 -> 841 us;
    * for per-key decays, whose factors are as large as the keys;
    * for maps that read a per-row scalar input: mamba2's walk without its decay math still took 513 us
      (-000140), its softplus(dt + bias) * B on the step's path."""
    return c.decay in ("scalar", "constant") and not c.row_maps and SBK * SBV <= KEYS_PASS_TILE


def out_key_blocks(c: ChunkCall, g: _Geom) -> bool:
    """Whether the two-pass forward's outputs walk the keys in blocks (chunk_out_kernel): key blocks, and a
    decay that is not per key. A per-key decay keeps its all-K output kernel, which was faster at every tile
    (B = 8, T = 4096, H = 16, K = V = 256, keyblock_bench-20261122-201936): gla 2.61 ms against 3.09 at best
    in 64-key blocks, 3.8-11 elsewhere. Its key loop holds the bisection levels, and Triton pipelined none of
    its loads there (no cp.async in the PTX, chunk_compile). A decay per row, 64-row chunks in 64-key blocks
    with 4 warps and 2 stages against the heuristic's 32-row all-K output: forward scalar decay 2.19 -> 1.60 ms,
    mamba2 2.09 -> 1.47 (output kernel 1.06 -> 0.82 and 0.92 -> 0.74, the states walk 1.0 -> 0.6)."""
    return g.NK > 1 and c.decay != "key"


def _dummy(c: ChunkCall) -> torch.Tensor:
    return _dummy_on(c.device)


@functools.lru_cache(maxsize=None)
def _dummy_on(device: torch.device) -> torch.Tensor:
    """One buffer per device for the pointer arguments a launch leaves unused (never read or written). A fresh
    one per call counted in every pass's peak memory: 512 bytes each, three a pass, which put linear
    attention's fwd+bwd at K = 256 1.5 KB over FLA's (compare-20261123-001433)."""
    return torch.empty(1, dtype=torch.float32, device=device)


def _launch_opts(g: _Geom, interpret: bool, states: bool = False) -> dict:
    if interpret:
        return {}
    if states:
        return {"num_warps": g.s_warps, "num_stages": g.s_stages}
    return {"num_warps": g.num_warps, "num_stages": g.num_stages}


def _interpret(c: ChunkCall) -> bool:
    return c.device.type != "cuda"


def _seq_args(c: ChunkCall, g: _Geom) -> list:
    d = _dummy(c)
    return [c.cu_seqlens if c.cu_seqlens is not None else d,
            g.coff if g.coff is not None else d,
            g.cseq if g.cseq is not None else d]


def _states(c: ChunkCall, g: _Geom, store_final: bool, for_backward: bool = False):
    """S^(c) (and z^(c)) of every chunk, in the dot operand dtype, and the final state (fp32); with the
    keys pass (g.pre) for_backward, also the dstates walk's q * exp(B) and the chunk decays, else dummies."""
    H, K, V, N = c.H, c.K, c.V, c.N
    dev, d = c.device, _dummy(c)
    Sbuf = torch.empty(max(g.NC_total, 1), H, K, V, dtype=_state_dtype(c.dtype), device=dev)
    zbuf = torch.empty(max(g.NC_total, 1), H, K, dtype=torch.float32, device=dev) if c.normalize else d
    ST = torch.empty(N, H, K, V, dtype=torch.float32, device=dev) if store_final else d
    zT = torch.empty(N, H, K, dtype=torch.float32, device=dev) if (store_final and c.normalize) else d
    kd = dl = qe = d
    if (g.pre or g.fact) and g.NC_total * H > 0:
        if g.fact:      # the rows' decay factors only (the forward)
            kd = torch.empty(g.NC_total, H, g.BT, dtype=torch.float32, device=dev)
        else:
            kd = torch.empty(g.NC_total, H, K, g.BT, dtype=_state_dtype(c.dtype), device=dev)
        qe = torch.empty_like(kd) if for_backward else d
        dl = torch.empty((g.NC_total, H, K) if c.decay == "key" else (g.NC_total, H), dtype=torch.float32,
                         device=dev)
        launch(c.module.chunk_keys_kernel, (g.NC_total * H,))(
            *c.map_args, kd, dl, qe, *_seq_args(c, g), c.T, c.scale,
            H=H, K=K, BT=g.BT, BK=g.BK, VARLEN=c.cu_seqlens is not None, QE=for_backward, FACT=g.fact,
            **_launch_opts(g, _interpret(c)))
    if N * H > 0:
        launch(c.module.chunk_states_kernel, (g.state_blocks(K, V), N * H))(
            *c.map_args,
            c.S0 if c.S0 is not None else d, c.z0 if c.z0 is not None else d, ST, zT, Sbuf, zbuf, kd, dl,
            *_seq_args(c, g),
            c.T, c.scale,
            H=H, K=K, V=V, BT=g.BT, BK=g.SBK, BV=g.SBV,
            USE_S0=c.S0 is not None, STORE_ST=store_final,
            VARLEN=c.cu_seqlens is not None, DOT_DT=g.dot_dt, PREC=g.prec, PRE=g.pre, FACT=g.fact,
            **_launch_opts(g, _interpret(c), states=True),
        )
    return Sbuf, zbuf, ST, zT, qe, dl


def _fwd_kernel(c: ChunkCall, g: _Geom, fused: bool, o, on, den, ST, zT, Sbuf, zbuf, save_on: bool):
    d = _dummy(c)
    H, K, V, N = c.H, c.K, c.V, c.N
    if not fused and out_key_blocks(c, g):
        # one program per (V-block, chunk, head)
        if g.NC_total * H > 0:
            launch(c.module.chunk_out_kernel, (g.NV, g.NC_total * H))(
                *c.map_args, o, on, den, Sbuf, zbuf, *_seq_args(c, g), c.T, c.scale,
                H=H, K=K, V=V, BT=g.BT, BK=g.KB, NK=g.NK, BV=g.BV, LOG2_BT=g.LOG2_BT,
                VARLEN=c.cu_seqlens is not None, SAVE_ON=save_on, DOT_DT=g.dot_dt, PREC=g.prec,
                **_launch_opts(g, _interpret(c)))
        return
    # fused: one program per (V-block, sequence, head); two_pass: one per (chunk, head), all V-blocks
    grid = (g.NV, N * H) if fused else (1, g.NC_total * H)
    if grid[1] == 0:
        return
    launch(c.module.chunk_fwd_kernel, grid)(
        *c.map_args,
        o, on, den, c.S0 if c.S0 is not None else d, c.z0 if c.z0 is not None else d, ST, zT, Sbuf, zbuf,
        *_seq_args(c, g),
        c.T, c.scale,
        H=H, K=K, V=V, BT=g.BT, BK=g.BK, BV=g.BV, LOG2_BT=g.LOG2_BT,
        FUSED=fused, USE_S0=c.S0 is not None, STORE_ST=fused and c.output_final_state,
        VARLEN=c.cu_seqlens is not None, SAVE_ON=save_on,
        DOT_DT=g.dot_dt, PREC=g.prec, **_launch_opts(g, _interpret(c)),
    )


# --------------------------------------------------------------------------- forward

def run_forward(c: ChunkCall, config: KernelConfig):
    """(o [B,T,H,V] in c.o_dtype, S_T or None, z_T or None)."""
    B, T, H, K, V, N = c.B, c.T, c.H, c.K, c.V, c.N
    dev, d = c.device, _dummy(c)
    o = torch.empty(B, T, H, V, dtype=c.o_dtype, device=dev)
    want = c.output_final_state
    if config.strategy == "paired" and pairs_ok(c):
        if N * H == 0:
            return o, _empty_final(c, want)[0], _empty_final(c, want)[1]
        ST = _paired_forward(c, config, o, want)
        return o, (ST if want else None), None
    g = _geometry(c, config)
    if config.strategy == "fused":
        ST = torch.empty(N, H, K, V, dtype=torch.float32, device=dev) if want else d
        zT = torch.empty(N, H, K, dtype=torch.float32, device=dev) if (want and c.normalize) else d
        if B * T == 0 or N * H == 0:
            return o, _empty_final(c, want)[0], _empty_final(c, want)[1]
        _fwd_kernel(c, g, True, o, d, d, ST, zT, d, d, save_on=False)
    else:
        Sbuf, zbuf, ST, zT, _, _ = _states(c, g, store_final=want)
        if N * H == 0:
            return o, _empty_final(c, want)[0], _empty_final(c, want)[1]
        _fwd_kernel(c, g, False, o, d, d, d, d, Sbuf, zbuf, save_on=False)
    return o, (ST if want else None), (zT if (want and c.normalize) else None)


def pairs_ok(c: ChunkCall) -> bool:
    """Whether the paired forward serves this call's mixer (config.paired_serves)."""
    return paired_serves(c.decay, c.inclusive, c.normalize, c.bonus, c.K)


def _paired_forward(c: ChunkCall, config: KernelConfig, o, want: bool):
    """The states walk over 2 * chunk rows, then chunk_out_pairs_kernel: S_T (no z_T: pairs_ok has no
    normalizer)."""
    g = _geometry(c, dataclasses.replace(config, chunk=2 * config.chunk))
    Sbuf, _, ST, _, _, _ = _states(c, g, store_final=want)
    if g.NC_total * c.H > 0:
        BT = config.chunk
        launch(c.module.chunk_out_pairs_kernel, (g.NC_total * c.H,))(
            *c.map_args, o, Sbuf, *_seq_args(c, g), c.T, c.scale,
            H=c.H, K=c.K, V=c.V, BT=BT, BK=g.BK, BV=g.BV, LOG2_BT=BT.bit_length() - 1,
            VARLEN=c.cu_seqlens is not None, DOT_DT=g.dot_dt, PREC=g.prec, **_launch_opts(g, _interpret(c)))
    return ST


def _empty_final(c: ChunkCall, want: bool):
    if not want:
        return None, None
    S = c.S0.clone() if c.S0 is not None else torch.zeros(c.N, c.H, c.K, c.V, device=c.device)
    z = None
    if c.normalize:
        z = c.z0.clone() if c.z0 is not None else torch.zeros(c.N, c.H, c.K, device=c.device)
    return S, z


# --------------------------------------------------------------------------- backward

def run_backward(c: ChunkCall, config: KernelConfig, do: torch.Tensor, dS_T: Optional[torch.Tensor],
                 dz_T: Optional[torch.Tensor]) -> dict:
    """Feature gradients: dict with dfq, dfk, dfv, dfa, dw, dS0, dz0 (fp32; dfq, dfk, dfv in
    c.dfeature_dtypes)."""
    g = _geometry(c, config, backward=True)
    B, T, H, K, V, N = c.B, c.T, c.H, c.K, c.V, c.N
    dev, d = c.device, _dummy(c)
    f32 = dict(dtype=torch.float32, device=dev)
    # the kernels read do in any float dtype (fp32 accumulation): a 16-bit do needs no conversion pass
    do = do.contiguous() if do.dtype in (torch.float32, torch.float16, torch.bfloat16) else do.contiguous().float()
    use_dst = dS_T is not None or (c.normalize and dz_T is not None)
    if use_dst:
        dS_T = (dS_T if dS_T is not None else torch.zeros(N, H, K, V, device=dev)).contiguous().float()
        if c.normalize:
            dz_T = (dz_T if dz_T is not None else torch.zeros(N, H, K, device=dev)).contiguous().float()
    has_decay = c.decay != "none"
    Sbuf, zbuf, _, _, qe, dl = _states(c, g, store_final=False, for_backward=True)

    den = dden = d
    if c.normalize:
        # o = num / den: the numerator's gradient is do / den, the denominator's dden = -(do . o_n) / den
        on = torch.empty(B, T, H, V, **f32)
        den = torch.empty(B, T, H, **f32)
        scratch = torch.empty(B, T, H, V, **f32)
        _fwd_kernel(c, g, False, scratch, on, den, d, d, Sbuf, zbuf, save_on=True)
        dden = -(do * on).sum(-1) / den
        del scratch, on

    # dS^(c+1) of every chunk, and dS0
    sdt = _state_dtype(c.dtype)
    dSbuf = torch.empty(max(g.NC_total, 1), H, K, V, dtype=sdt, device=dev)
    dzbuf = torch.empty(max(g.NC_total, 1), H, K, **f32) if c.normalize else d
    # without an initial state nothing reads dS0 (32 MiB in fp32 at B = 8, H = 16, K = V = 256)
    store_ds0 = c.S0 is not None
    dS0 = torch.empty(N, H, K, V, **f32) if store_ds0 else d
    dz0 = torch.empty(N, H, K, **f32) if (store_ds0 and c.normalize) else d
    if N * H > 0:
        launch(c.module.chunk_dstates_kernel, (g.state_blocks(K, V), N * H))(
            *c.map_args,
            do, den, dden, dS_T if use_dst else d, dz_T if (use_dst and c.normalize) else d,
            dS0, dz0, dSbuf, dzbuf, qe, dl,
            *_seq_args(c, g),
            c.T, c.scale,
            H=H, K=K, V=V, BT=g.BT, BK=g.SBK, BV=g.SBV,
            USE_DST=use_dst, VARLEN=c.cu_seqlens is not None, DOT_DT=g.dot_dt, PREC=g.prec, PRE=g.pre,
            STORE_DS0=store_ds0, **_launch_opts(g, _interpret(c), states=True),
        )
    del qe, dl      # the dstates walk's inputs only: freed before the backward kernel's allocations

    # exclusive with a bonus: the bonus's dk, dv stay on the q row's token, in their own buffers (summed
    # below, in fp32)
    two = c.bonus and not c.inclusive
    dq_dt, dk_dt, dv_dt = c.dfeature_dtypes
    if two:
        dk_dt = dv_dt = torch.float32
    dq = torch.empty(B, T, H, K, dtype=dq_dt, device=dev)
    dk = torch.empty(B, T, H, K, dtype=dk_dt, device=dev)
    dv = torch.empty(B, T, H, V, dtype=dv_dt, device=dev)
    # a decay per row in key blocks: each block's share of dfa, summed below
    lshape = (B, T, H, K) if c.decay == "key" else (g.NK, B, T, H)
    dfa = torch.empty(lshape, **f32) if has_decay else d
    dk2 = torch.empty(B, T, H, K, **f32) if two else d
    dv2 = torch.empty(B, T, H, V, **f32) if two else d
    n_prog = g.NC_total * H
    dw = torch.empty(max(n_prog, 1), K, **f32) if c.bonus else d
    # key blocks: one program per (chunk, head, key block) leaves its decayed keys and attention block here,
    # and chunk_dv_kernel computes dv from them (it needs the whole of A)
    blocks = g.NK > 1
    kdbuf = torch.empty(max(g.NC_total, 1), H, g.BT, K, dtype=sdt, device=dev) if blocks else d
    Abuf = torch.empty(g.NK, max(g.NC_total, 1), H, g.BT, g.BT, **f32) if blocks else d
    if n_prog > 0:
        launch(c.module.chunk_bwd_kernel, (n_prog, g.NK))(
            *c.map_args,
            do, den, dden, Sbuf, zbuf, dSbuf, dzbuf, kdbuf, Abuf,
            dq, dk, dv, dfa, dk2, dv2, dw,
            *_seq_args(c, g),
            c.T, c.scale, g.NC_total, B * T * H,
            H=H, K=K, V=V, BT=g.BT, BK=g.KB, NK=g.NK, BV=g.BV, LOG2_BT=g.LOG2_BT,
            VARLEN=c.cu_seqlens is not None, DOT_DT=g.dot_dt, PREC=g.prec,
            **_launch_opts(g, _interpret(c)),
        )
        if blocks:
            launch(c.module.chunk_dv_kernel, (n_prog,))(
                *c.map_args,
                do, den, dSbuf, kdbuf, Abuf, dv, dv2,
                *_seq_args(c, g),
                c.T, c.scale, g.NC_total,
                H=H, K=K, V=V, BT=g.BT, BK=g.KB, NK=g.NK, BV=g.BV,
                VARLEN=c.cu_seqlens is not None, DOT_DT=g.dot_dt, PREC=g.prec,
                **_launch_opts(g, _interpret(c)),
            )
    del kdbuf, Abuf
    if two:
        dk = dk + dk2
        dv = dv + dv2
    dfa_out = None
    if has_decay:
        if c.decay != "key":
            dfa = dfa[0] if g.NK == 1 else dfa.sum(0)
        dfa_out = dfa.sum((0, 1)) if c.decay == "constant" else dfa
    dw_out = None
    if c.bonus:
        dw_out = dw[:n_prog].reshape(-1, H, K).sum(0) if n_prog > 0 else torch.zeros(H, K, **f32)
    return dict(dfq=dq, dfk=dk, dfv=dv, dfa=dfa_out, dw=dw_out,
                dS0=dS0 if store_ds0 else None,
                dz0=dz0 if (c.normalize and store_ds0) else None)


# --------------------------------------------------------------------------- the path interface

def forward(ctx, config: KernelConfig):
    from .core import CoreForward

    o, S_T, z_T = run_forward(ChunkCall.from_ctx(ctx), config)
    return CoreForward(o=o, S_T=S_T, z_T=z_T)


def backward(ctx, config: KernelConfig, do, dS_T, dz_T):
    from .core import FeatureGrads

    return FeatureGrads(**run_backward(ChunkCall.from_ctx(ctx), config, do, dS_T, dz_T))
