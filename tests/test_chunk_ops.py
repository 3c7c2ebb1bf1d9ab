"""End to end: `ops.chunk` (generated module, maps computed in-kernel from raw inputs, the chunked path)
against the float64 reference, values, final state and the gradient of every input, parameter and
initial state. Interpreter, fp32, small shapes."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import mixforge as mf
from mixforge import Bonus, Input, Mixer, Param, s, value
from mixforge.codegen import chunk as chunk_path
from mixforge.codegen.config import KernelConfig
from mixforge.functions import exp, logsigmoid, sigmoid, silu, softplus, tanh
from mixforge.spec import zoo
from mixforge.spec.shapes import resolve_call
from mixforge.spec.testing import random_inputs

from test_chunk_support import assert_close, rel


def check(mixer, strategy="fused", B=2, T=40, H=2, K=8, V=12, cu_seqlens=None, decay="normal", seed=0, BK=None,
          groups=None):
    """groups: {grouped input: its number of groups G} (default 1 for every grouped input)."""
    ops = mf.compile(mixer)
    x = random_inputs(mixer, B=B, T=T, H=H, K=K, V=V, seed=seed, decay=decay, requires_grad=True)
    for n, G in (groups or {}).items():
        x[n] = (0.5 * torch.randn(B, T, G, K, generator=torch.Generator().manual_seed(seed + G))).requires_grad_()
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    sh = resolve_call(mixer, x)          # K, V as the inputs define them (griffin, rwkv4: K = 1)
    K, V = sh.K, sh.V
    gen = torch.Generator().manual_seed(seed + 7)
    S0 = torch.randn(N, H, K, V, generator=gen)
    init = (S0, torch.rand(N, H, K, generator=gen) + 0.5) if mixer.normalize else (S0,)
    init = [t.requires_grad_() for t in init]
    pack = (lambda xs: tuple(xs)) if mixer.normalize else (lambda xs: xs[0])
    config = KernelConfig(chunk=16, sub_chunk=8, BK=BK, BV=16, strategy=strategy)
    calls = []
    real = chunk_path.run_forward

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    chunk_path.run_forward = spy
    try:
        y, ST = ops.chunk(**x, initial_state=pack(init), output_final_state=True, cu_seqlens=cu_seqlens,
                          config=config)
    finally:
        chunk_path.run_forward = real
    assert calls, "ops.chunk did not run the chunked path"
    xr = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    initr = [t.detach().double().requires_grad_() for t in init]
    yr, STr = mf.reference(mixer, **xr, initial_state=pack(initr), output_final_state=True, cu_seqlens=cu_seqlens)
    STs, STrs = (list(ST), list(STr)) if mixer.normalize else ([ST], [STr])
    gy = torch.randn(yr.shape, generator=gen, dtype=torch.float64)
    gS = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in STrs]
    loss = (y * gy.float()).sum() + sum((a * b.float()).sum() for a, b in zip(STs, gS))
    loss_r = (yr * gy).sum() + sum((a * b).sum() for a, b in zip(STrs, gS))
    names = list(x) + ["S0", "z0"][:len(init)]
    grads = torch.autograd.grad(loss, list(x.values()) + init)
    grads_r = torch.autograd.grad(loss_r, list(xr.values()) + initr)
    errs = {"y": rel(y, yr)}
    errs.update({f"S_T[{i}]": rel(a, b) for i, (a, b) in enumerate(zip(STs, STrs))})
    # a gradient that is zero in exact arithmetic (performer's qn: a per-token scale of q cancels in the
    # denominator) is compared against a floor, not against its own rounding noise
    errs.update({f"d{n}": rel(a, b) if b.norm() > 1e-6 * b.numel() ** 0.5 else float((a.double() - b).norm()) / b.numel() ** 0.5
                 for n, a, b in zip(names, grads, grads_r)})
    assert_close(errs)


@pytest.mark.parametrize("name", sorted(zoo.ALL))
def test_zoo_fused(name):
    check(zoo.ALL[name], "fused")


@pytest.mark.parametrize("name", ["gla", "rwkv6", "mamba2", "rwkv4", "metala", "cosformer"])
def test_zoo_two_pass(name):
    check(zoo.ALL[name], "two_pass")


@pytest.mark.parametrize("groups", [{"C": 1, "B": 1}, {"C": 2, "B": 2}, {"C": 1, "B": 4}])
def test_grouped_inputs(groups):
    """mamba2's C and B shared by the H / G heads of a group, H = 4: of one grouping, the chain kernel sums a
    group's heads itself (4 or 2 heads a program); of two, per head, and the heads are summed after it."""
    check(zoo.mamba2, H=4, groups=groups)


@pytest.mark.parametrize("name", ["gla", "rwkv6", "mamba2"])
def test_strong_decay(name):
    check(zoo.ALL[name], decay="strong")


@pytest.mark.parametrize("strategy", ["fused", "two_pass"])
@pytest.mark.parametrize("name", ["gla", "rwkv6", "cosformer"])
def test_varlen_with_empty_sequences(name, strategy):
    """cosformer's maps use the position t, which restarts in every packed sequence."""
    cu = torch.tensor([0, 7, 7, 23, 40], dtype=torch.int32)
    check(zoo.ALL[name], strategy, B=1, cu_seqlens=cu)


def test_odd_dims():
    check(zoo.gla, "two_pass", T=17, K=5, V=7)


@pytest.mark.parametrize("name", ["gla", "rwkv6", "mamba2", "rfa", "performer", "linear_attention"])
def test_states_kernels_split_keys_and_values(name):
    """The states and dstates kernels split the state into (K-block, V-block) programs of their own (BK 16
    here: three key blocks at K = 40, the last one masked; two value blocks at V = 36): per-key and
    scalar decays, exclusive with a bonus, normalize (z per key block), grouped inputs; cosformer (the
    position t) has the same split in test_states_kernels_split_under_varlen."""
    x = random_inputs(zoo.ALL[name], B=1, T=8, H=2, K=40, V=36)
    sh = resolve_call(zoo.ALL[name], x)
    assert chunk_path.state_tiles(sh.K, sh.V, 2, 16, 16, 132) == (16, 32, True)
    check(zoo.ALL[name], "two_pass", K=40, V=36, BK=16)


@pytest.mark.parametrize("inclusive", [True, False])
def test_key_block_outputs_with_a_bonus(inclusive):
    """The two-pass forward's output kernel in key blocks (chunk_out_kernel) sums the bonus's s over its key
    blocks. No zoo mixer reaches that: the bonus mixers' decays are per key (rwkv6, metala) or their K is 1
    (rwkv4). A scalar decay with a bonus, exclusive and inclusive, three key blocks (the last masked)."""
    m = Mixer("scalar_bonus", fq=zoo.q, fk=zoo.k, fv=zoo.v, fa=logsigmoid(Input("a", dim=None)), inclusive=inclusive,
              bonus=Bonus(weight=Param("u"), term=s * value))
    check(m, "two_pass", K=40, V=36, BK=16)


@pytest.mark.parametrize("walk", ["keys", "factors", "step"])
@pytest.mark.parametrize("name", ["gla", "rwkv6", "mamba2", "retnet", "griffin", "scalar_decay"])
def test_states_walk_with_and_without_the_keys_pass(name, walk, monkeypatch):
    """Split states and dstates walks read the decayed keys, q * exp(B) and chunk decays of chunk_keys_kernel
    (PRE), or (the forward's states walk, a decay that is not per key) only its decay factors, computing the
    maps (FACT), or compute all at every step, their per-row scalar inputs (mamba2's dt, griffin's gates) loaded a chunk ahead: per-key,
    scalar and constant decays, exclusive with a bonus, grouped inputs, three key blocks (the last masked),
    varlen with an empty sequence; values and gradients, both against the reference."""
    mixer = SCALAR_DECAY if name == "scalar_decay" else zoo.ALL[name]
    decided = []
    real = chunk_path.walk_keys
    monkeypatch.setattr(chunk_path, "KEYS_PASS_WALK", 0)     # these walks are short; the rule on length is tested apart
    monkeypatch.setattr(chunk_path, "walk_keys",
                        lambda c, split, *tiles: decided.append(real(c, split, *tiles)) or (walk != "step" and decided[-1]))
    monkeypatch.setattr(chunk_path, "walk_factors", lambda c, *tiles: walk == "factors" and c.decay != "key")
    cu = torch.tensor([0, 7, 7, 23, 40], dtype=torch.int32)
    check(mixer, "two_pass", B=1, K=40, V=36, BK=16, cu_seqlens=cu)
    assert decided and all(decided)     # split at these sizes, and a decay that the keys pass serves


#: a decay per row whose maps read no per-row input (the compare's scalar decay): the one that walk_factors serves
SCALAR_DECAY = Mixer("scalar_decay", fq=zoo.q, fk=zoo.k, fv=zoo.v, fa=logsigmoid(Input("a", dim=None)))


def chunk_call(mixer, B=1, T=8, H=2, K=8, V=8, cu=None, dtype=torch.float32) -> chunk_path.ChunkCall:
    """A ChunkCall of a mixer (a zoo name or a Mixer) without tensors: what the launch rules (walk_keys,
    walk_factors, _geometry) read."""
    ops = mf.compile(zoo.ALL[mixer] if isinstance(mixer, str) else mixer)
    plan = ops.plan
    N = B if cu is None else len(cu) - 1
    return chunk_path.ChunkCall(ops.module, [], B, T, H, K, V, N, 1.0, plan.decay, plan.inclusive, plan.normalize,
                                plan.bonus, cu, None, None, False, dtype, torch.device("cpu"),
                                row_maps=plan.row_maps)


def test_walk_factors_for_a_decay_per_row_or_constant_whose_maps_read_no_row_input():
    def factors(mixer, tile=(32, 32)):
        return chunk_path.walk_factors(chunk_call(mixer), *tile)
    assert factors(SCALAR_DECAY) and factors(zoo.retnet)
    assert not factors(zoo.mamba2)                    # fk = B * softplus(dt + bias): the maps read a row input
    assert not factors(zoo.gla)                       # per key
    assert not factors(SCALAR_DECAY, (64, 256))       # state tiles over KEYS_PASS_TILE keep the keys pass


@pytest.mark.parametrize("pre", [True, False])
@pytest.mark.parametrize("strategy", ["fused", "two_pass"])
def test_walks_load_a_shared_row_input_ahead_on_both_sides_of_an_exclusive_mixer(strategy, pre, monkeypatch):
    """One per-row scalar input r in q, k and the decay of an exclusive mixer: the q side reads r at the chunk's
    own rows, the k side and decay one token earlier. The fused forward's walk and the dstates walk load only
    the k side's (the dstates walk: the decay's) r a chunk ahead and the q side's in the step; the two must not
    be mixed up. Varlen with an empty sequence; values and gradients against the reference."""
    r = Input("r", dim=None)
    m = Mixer("exclusive_shared_row", fq=zoo.q * sigmoid(r), fk=zoo.k * sigmoid(-r), fv=zoo.v, fa=logsigmoid(r),
              inclusive=False)
    monkeypatch.setattr(chunk_path, "walk_keys", lambda c, split, *tiles: pre and split)
    cu = torch.tensor([0, 7, 7, 23, 40], dtype=torch.int32)
    check(m, strategy, B=1, K=40, V=36, BK=16, cu_seqlens=cu)
    check(m, strategy, T=37)


def test_walk_keys_only_for_split_decaying_states_without_normalize():
    def keys(mixer, split=True, BT=64, tile=(64, 64), T=64 * 129, cu=None):
        return chunk_path.walk_keys(chunk_call(mixer, T=T, cu=cu), split, BT, *tile)

    assert keys("gla") and keys("retnet") and keys("mamba2")                 # 129 chunks
    assert not keys("gla", split=False)                                     # many sequences: walks stay as they are
    assert not keys("linear_attention")                                     # no decay (and normalize)
    assert not keys("rfa")                                                  # normalize: z sums the fp32 keys
    # a decay per row (or a constant one) on a walk of at most KEYS_PASS_WALK chunks in tiles of at most
    # KEYS_PASS_TILE computes its decayed keys itself; a per-key decay's walk reads the keys pass at any length
    assert not keys("mamba2", T=64 * 128) and not keys("retnet", T=64 * 128)
    assert not keys("mamba2", BT=128) and not keys("mamba2", T=64 * 128, tile=(32, 32))
    assert keys("mamba2", T=64 * 128, tile=(64, 128)) and keys("mamba2", T=64 * 64, tile=(64, 256))
    assert keys("gla", T=64)
    # an exclusive mixer walks T + 1 positions
    excl = Mixer("exclusive_scalar", fq=zoo.q, fk=zoo.k, fv=zoo.v, fa=logsigmoid(Input("a", dim=None)), inclusive=False)
    assert keys(excl, T=64 * 128) and not keys(excl, T=64 * 128 - 1)
    # varlen: the mean sequence's chunks
    assert keys("mamba2", T=64 * 258, cu=torch.tensor([0, 64 * 200, 64 * 258], dtype=torch.int32))     # 129
    assert not keys("mamba2", T=64 * 256, cu=torch.tensor([0, 64 * 200, 64 * 256], dtype=torch.int32))  # 128


def test_split_walks_pipeline_one_stage_deeper_without_a_decay_in_small_tiles():
    """Few long sequences split the states walks (SPLIT_LAUNCH); a walk with no decay math on its step takes a
    fourth stage in tiles of at most DEEP_SPLIT_TILE. Sequences enough for whole-state walks keep the config's
    launch."""
    def launch(mixer, B, BV=64):
        c = chunk_call(mixer, B=B, T=4096, H=16, K=128, V=128, dtype=torch.bfloat16)
        g = chunk_path._geometry(c, KernelConfig(chunk=64, sub_chunk=16, BV=BV, num_warps=8, num_stages=1))
        return (g.SBK, g.SBV), (g.s_warps, g.s_stages)
    assert launch("linear_attention", 1) == ((32, 32), chunk_path.SPLIT_LAUNCH_NO_DECAY) == ((32, 32), (4, 4))
    assert launch("retnet", 1)[1] == launch("gla", 1)[1] == chunk_path.SPLIT_LAUNCH == (4, 3)
    assert launch("linear_attention", 4, BV=128) == ((32, 128), (4, 3))
    assert launch("linear_attention", 16)[1] == launch("retnet", 16)[1] == (8, 1)


@pytest.mark.parametrize("name", ["gla", "cosformer"])
def test_states_kernels_split_under_varlen(name):
    cu = torch.tensor([0, 7, 7, 23, 40], dtype=torch.int32)
    check(zoo.ALL[name], "two_pass", B=1, K=40, V=36, BK=16, cu_seqlens=cu)


def test_state_tiles_fill_the_gpu_with_few_sequences():
    # B * H = 16 at K = V = 128 (B = 1, T = 32768): 32 programs with the main tiles; keys split first, then values
    assert chunk_path.state_tiles(128, 128, 16, None, 64, 132) == (32, 32, True)
    assert chunk_path.state_tiles(128, 128, 64, None, 128, 132) == (32, 128, True)   # gla at B * H = 64
    # enough programs with the main kernels' tiles (and launch): unchanged
    assert chunk_path.state_tiles(128, 128, 64, None, 64, 132) == (128, 64, False)
    assert chunk_path.state_tiles(128, 128, 256, None, 128, 132) == (128, 128, False)
    assert chunk_path.state_tiles(256, 256, 128, None, 64, 132) == (256, 64, False)
    # a split state holds at most 128 x 128 (K = V = 256 at B * H = 16)
    assert chunk_path.state_tiles(256, 256, 16, None, 64, 132) == (32, 128, True)
    # a fixed BK is kept; the values take the split
    assert chunk_path.state_tiles(128, 128, 16, 64, 128, 132) == (64, 32, True)
    # never below 32 keys and values (or the key tile of a small K)
    assert chunk_path.state_tiles(16, 32, 1, None, 32, 132) == (16, 32, True)


def test_unused_pointer_arguments_share_one_buffer_a_device():
    """The launches' placeholder for unused pointers is allocated once a device, not once a pass: a fresh one
    counted in every pass's peak memory (linear attention's fwd+bwd at K = 256 came out 1.5 KB over FLA's)."""
    ops = mf.compile(zoo.linear_attention)

    def call():
        return chunk_path.ChunkCall(ops.module, [], 1, 8, 2, 8, 8, 1, 1.0, ops.plan.decay, ops.plan.inclusive,
                                    ops.plan.normalize, ops.plan.bonus, None, None, None, False, torch.float32,
                                    torch.device("cpu"))
    assert chunk_path._dummy(call()) is chunk_path._dummy(call())
