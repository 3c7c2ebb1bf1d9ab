"""The search space: constraints prune invalid configs, and pruned configs never reach the runner."""
import dataclasses

import optuna
import pytest

from mixforge.codegen.config import KernelConfig
from mixforge.tuner.space import (H100, CHUNK_KERNELS, DeviceLimits, Problem, build_space, estimate_resources)
from mixforge.tuner.study import open_study, optimize
from mixforge.tuner.testing import SyntheticObjective

GLA = Problem(K=128, V=128, dtype="bf16", decay="key")
MAMBA2 = Problem(K=128, V=128, dtype="bf16", decay="scalar")


def gpu_space(kernel="chunk_fwd", p=GLA, limits=H100):
    return build_space(kernel, p, limits=limits, interpret=False)


def test_grid_holds_only_valid_configs_and_pruned_ones_say_why():
    sp = gpu_space()
    grid = sp.grid()
    assert 0 < len(grid) < len(list(sp.candidates()))
    for cfg in grid:
        assert sp.check(cfg) == []
        assert cfg.chunk % cfg.sub_chunk == 0 and cfg.BV <= 128
    pruned = sp.pruned()
    assert pruned and all(reasons for _, reasons in pruned)
    assert {c for c, _ in pruned}.isdisjoint(grid)


@pytest.mark.parametrize("cfg, needle", [
    (KernelConfig(chunk=64, sub_chunk=48, BV=64), "power of two"),
    (KernelConfig(chunk=32, sub_chunk=64, BV=64), "multiple of sub_chunk"),
    (KernelConfig(chunk=64, sub_chunk=16, BV=256), "V padded"),
    (KernelConfig(chunk=64, sub_chunk=8, BV=64), "tl.dot minimum"),
    (KernelConfig(chunk=64, sub_chunk=16, BK=64, BV=64), "BK=64"),
    (KernelConfig(chunk=128, sub_chunk=16, BV=64, num_warps=8), None),
    (KernelConfig(chunk=64, sub_chunk=16, BV=64, num_warps=6), "power of two"),
    (KernelConfig(chunk=64, sub_chunk=16, BV=3), "power of two"),
    (KernelConfig(chunk=64, sub_chunk=16, BV=64, strategy="magic"), "strategy"),
])
def test_constraints_name_the_problem(cfg, needle):
    reasons = gpu_space().check(cfg)
    if needle is None:
        assert reasons == []
    else:
        assert any(needle in r for r in reasons), reasons


def test_shared_memory_and_register_estimates_prune():
    sp = gpu_space()
    big = KernelConfig(chunk=128, sub_chunk=64, BV=128, num_warps=8, num_stages=3)
    res = estimate_resources("chunk_fwd", big, GLA)
    assert res.smem_bytes > H100.smem_per_block
    assert any("shared memory" in r for r in sp.check(big))
    # the same config fits a device with more shared memory
    roomy = DeviceLimits(smem_per_block=10 * res.smem_bytes, regs_per_thread=10_000, regs_per_sm=10 ** 9)
    assert gpu_space(limits=roomy).check(big) == []
    # registers: a big state over two warps spills far past 255 per thread
    few = KernelConfig(chunk=128, sub_chunk=32, BV=128, num_warps=2, num_stages=1)
    assert any("registers" in r for r in sp.check(few))
    # more stages never need less shared memory; fp32 never less than bf16
    for s in (1, 2):
        a = KernelConfig(chunk=64, sub_chunk=16, BV=64, num_stages=s)
        b = KernelConfig(chunk=64, sub_chunk=16, BV=64, num_stages=s + 1)
        assert estimate_resources("chunk_fwd", a, GLA).smem_bytes < estimate_resources("chunk_fwd", b, GLA).smem_bytes
    f32 = Problem(K=128, V=128, dtype="fp32", decay="key")
    c = KernelConfig()
    assert estimate_resources("chunk_fwd", c, f32).smem_bytes > estimate_resources("chunk_fwd", c, GLA).smem_bytes


def test_heuristic_default_is_in_the_gpu_space():
    for kernel in CHUNK_KERNELS:
        for p in (GLA, MAMBA2, Problem(K=64, V=64, dtype="bf16", decay="key")):
            sp = gpu_space(kernel, p)
            assert sp.contains(sp.heuristic()), (kernel, p, sp.check(sp.heuristic()))


def test_heuristic_baseline_fits_its_strategy_to_the_tuned_shape():
    """The tuner's baseline is what the ops run untuned at that shape: at B*H = 16, T = 32768 the ops run
    the heuristic's forward two-pass (paired where that kernel serves the mixer), so that is the config a tune
    must beat."""
    for p, strategy in ((GLA, "two_pass"), (MAMBA2, "paired")):
        sp = gpu_space("chunk_fwd", p)
        few_long = sp.heuristic(NH=16, T=32768)
        assert few_long.strategy == strategy and sp.contains(few_long)
        assert sp.heuristic(NH=256, T=2048) == sp.heuristic()      # enough programs: as chosen blind
        assert gpu_space("chunk_bwd", p).heuristic(NH=16, T=32768) == gpu_space("chunk_bwd", p).heuristic()
    assert gpu_space("chunk_fwd", MAMBA2).heuristic().strategy == "fused"   # so the fit above changed it


def test_a_per_key_forward_over_few_long_sequences_takes_four_warps():
    """The tuner's pick for four per-key mixers at B = 1, T = 32768 (codegen.config.fit_per_key_warps); at
    B = 4, T = 4096, with the sizes unknown, or in fp32 the grid's 8 warps stay."""
    from mixforge.codegen.config import heuristic_config

    few_long = heuristic_config("chunk_fwd", 128, 128, "bf16", decay="key", NH=16, T=32768)
    assert (few_long.chunk, few_long.BV, few_long.num_warps, few_long.num_stages, few_long.strategy) == \
        (32, 128, 4, 3, "two_pass")
    assert gpu_space("chunk_fwd", GLA).contains(few_long)
    for kw in (dict(NH=64, T=4096), {}):
        assert heuristic_config("chunk_fwd", 128, 128, "bf16", decay="key", **kw).num_warps == 8
    assert heuristic_config("chunk_fwd", 128, 128, "fp32", decay="key", NH=16, T=32768).num_warps == 8
    assert heuristic_config("chunk_bwd", 128, 128, "bf16", decay="key", NH=16, T=32768).num_warps == 8


def test_axes_follow_the_kernel_and_the_decay():
    rec = gpu_space("recurrent_fwd")
    assert set(rec.axes) == {"BV", "num_warps"}
    assert all(c.chunk == rec.fixed["chunk"] for c in rec.grid())
    # all of K in one tile up to K = 128 (but see the test below): BK is pinned, never searched
    for kernel, p in (("chunk_fwd", GLA), ("chunk_bwd", GLA), ("chunk_bwd", MAMBA2)):
        sp = gpu_space(kernel, p)
        assert "BK" not in sp.axes and all(c.BK is None for c in sp.grid())
    assert set(gpu_space("chunk_fwd", GLA).choices("strategy")) == {"fused", "two_pass"}
    # axes given by the caller: an unsearched sub_chunk is pinned to a divisor of every chunk
    sp = build_space("chunk_fwd", MAMBA2, limits=H100, interpret=False,
                     axes={"chunk": (32, 64), "BV": (32, 64), "num_warps": (4,)})
    assert "sub_chunk" not in sp.axes and len(sp.grid()) == 4
    assert all(c.chunk % c.sub_chunk == 0 for c in sp.grid())
    with pytest.raises(ValueError, match="unknown axes"):
        build_space("chunk_fwd", GLA, axes={"tile": (1,)})
    with pytest.raises(ValueError, match="unknown kernel"):
        build_space("chunk_sideways", GLA)


def test_space_hash_changes_with_the_space():
    assert gpu_space().hash == gpu_space().hash
    assert gpu_space().hash != gpu_space(p=MAMBA2).hash
    assert gpu_space().hash != gpu_space(limits=DeviceLimits(smem_per_block=100 * 1024)).hash


def test_invalid_samples_never_reach_the_runner(tmp_path):
    # a space where most axis combinations are invalid: the sampler proposes them, they are skipped unbuilt
    sp = gpu_space("chunk_fwd", GLA, limits=DeviceLimits(smem_per_block=64 * 1024))
    obj = SyntheticObjective()
    study = open_study("pruning", optuna.storages.InMemoryStorage(), seed=3)
    rep = optimize(study, sp, obj, n_trials=15)
    assert obj.calls, "nothing ran"
    assert all(sp.is_valid(c) for c in obj.calls)
    assert len(obj.calls) == len(set(obj.calls)) == 15
    skipped = [t for t in study.trials if t.user_attrs.get("skipped") == "invalid"]
    assert skipped, "the sampler never proposed an invalid combination; the test proves nothing"
    assert rep.skipped >= len(skipped)
    for t in skipped:
        assert not sp.is_valid(sp.config(t.params))


@pytest.mark.parametrize("decay", ["none", "scalar", "key"])
@pytest.mark.parametrize("K,V", [(128, 64), (128, 96), (128, 128), (256, 256), (256, 192), (192, 96)])
@pytest.mark.parametrize("kernel", ["chunk_fwd", "chunk_bwd"])
def test_gpu_defaults_are_configs_the_kernels_accept(kernel, K, V, decay):
    """The GPU heuristic (what runs without a tuned config) is a valid point of the H100 search space."""
    from mixforge.codegen.config import heuristic_config

    p = Problem(K=K, V=V, dtype="bf16", decay=decay)
    cfg = heuristic_config(kernel, K, V, "bf16", interpret=False, decay=decay)
    assert build_space(kernel, p, limits=H100, interpret=False).check(cfg, estimate=False) == []
    # wide value tiles only where V splits into whole 64-wide blocks (see codegen/config.py; K <= 128)
    if decay != "key" and V % 64 and K <= 128:
        assert cfg.BV >= V


def test_gpu_defaults_above_k128_follow_the_measured_winners():
    """K = V = 256 bf16 (the tuner's winners on the H100): per-key and scalar decays run the two-pass forward
    (the fused walk's state and per-key factors spill with all of K in one tile), no decay stays fused; the
    decaying backwards unpipelined. Other dtypes keep the unmeasured small tiles."""
    from mixforge.codegen.config import heuristic_config

    fwd = {d: heuristic_config("chunk_fwd", 256, 256, "bf16", decay=d) for d in ("none", "scalar", "key")}
    assert [fwd[d].strategy for d in ("none", "scalar", "key")] == ["fused", "two_pass", "two_pass"]
    assert (fwd["none"].chunk, fwd["none"].BV, fwd["key"].chunk, fwd["key"].BV) == (64, 128, 32, 128)
    assert heuristic_config("chunk_bwd", 256, 256, "bf16", decay="scalar").num_stages == 1
    assert heuristic_config("chunk_fwd", 256, 256, "fp32", decay="scalar").strategy == "fused"
    assert heuristic_config("chunk_fwd", 256, 256, "bf16", decay=None).strategy == "fused"   # decay unknown


@pytest.mark.parametrize("kernel", ["chunk_fwd", "chunk_bwd"])
@pytest.mark.parametrize("p", [Problem(K=256, V=256, dtype="bf16", decay="key"),
                               Problem(K=256, V=256, dtype="bf16", decay="scalar")])
def test_key_blocks_are_searched_past_k_128(kernel, p):
    """K = 256: whole-K tiles spill in the backward, and the states walks need their keys split. The space
    searches all of K, 128 and 64; the heuristic (key blocks of 128 for a per-key decay, 64 for a decay per
    row) lies in it, and key blocks are estimated by their own size
    where a kernel walks them: the backward, and the two-pass forward's output without a per-key decay."""
    sp = gpu_space(kernel, p)
    assert set(sp.choices("BK")) == {None, 128, 64}
    assert sp.contains(sp.heuristic())
    assert sp.heuristic().BK == (128 if p.decay == "key" else 64)
    for strategy in ("fused", "two_pass"):
        cfg = KernelConfig(chunk=32, sub_chunk=16, BV=64, num_warps=4, num_stages=1, strategy=strategy)
        whole, blocks = (estimate_resources(kernel, dataclasses.replace(cfg, BK=bk), p) for bk in (None, 64))
        walks_blocks = kernel == "chunk_bwd" or (strategy == "two_pass" and p.decay != "key")
        assert (blocks.regs_per_thread < whole.regs_per_thread) == walks_blocks
    assert any("tl.dot minimum" in r for r in sp.check(dataclasses.replace(cfg, BK=8)))


@pytest.mark.parametrize("decay", ["scalar", "none"])
def test_the_two_pass_forward_may_take_key_blocks_at_k_128(decay):
    """K = 128: a decay per row (or none) may walk its two-pass outputs and states in 64-key blocks; a fused
    forward, the backward and a per-key decay keep all of K. The heuristic takes the key blocks for a scalar
    decay at B*H = 64 (B = 4, H = 16), where they were measured fastest, and the tuner's space holds it."""
    p = Problem(K=128, V=128, dtype="bf16", decay=decay)
    sp = gpu_space("chunk_fwd", p)
    assert set(sp.choices("BK")) == {None, 64}
    assert {c.strategy for c in sp.grid() if c.BK} == {"two_pass"}
    two_pass = KernelConfig(chunk=64, sub_chunk=16, BK=64, BV=128, num_warps=4, num_stages=3, strategy="two_pass")
    assert sp.check(two_pass) == []
    assert any("BK=64" in r for r in sp.check(dataclasses.replace(two_pass, strategy="fused")))
    assert any("BK=32" in r for r in sp.check(dataclasses.replace(two_pass, BK=32)))
    for kernel, other in (("chunk_bwd", p), ("chunk_fwd", GLA)):
        assert any("BK=64" in r for r in gpu_space(kernel, other).check(two_pass))
    few = sp.heuristic(NH=64, T=8192)
    assert sp.contains(few)
    assert (few == two_pass) == (decay == "scalar")
    assert sp.heuristic(NH=256, T=2048).BK is None and sp.heuristic(NH=16, T=32768).BK is None
    assert sp.heuristic(NH=64, T=512).BK is None      # 8 chunks: the fused walk is short
    constant = gpu_space("chunk_fwd", Problem(K=128, V=128, dtype="bf16", decay="constant"))
    assert constant.heuristic(NH=64, T=8192).BK is None and 64 in constant.choices("BK")


def test_a_per_key_backward_at_k_64_takes_its_own_tiles():
    """K = V = 64: the tuner's winner for gla, hgrn2 and rwkv6 (4 warps, 3 stages); K = 128 and the other
    dtypes keep the per-key tiles measured there."""
    k64 = gpu_space("chunk_bwd", Problem(K=64, V=64, dtype="bf16", decay="key")).heuristic()
    assert (k64.chunk, k64.BV, k64.num_warps, k64.num_stages) == (32, 64, 4, 3)
    for p in (GLA, Problem(K=64, V=64, dtype="fp32", decay="key")):
        assert (gpu_space("chunk_bwd", p).heuristic().num_warps, gpu_space("chunk_bwd", p).heuristic().num_stages) \
            == (8, 2)


def test_the_paired_forward_is_searched_where_its_kernel_serves_the_mixer():
    """chunk_fwd's strategies take "paired" for a decay per row or none, inclusive, without normalizer or bonus,
    K <= 128 (codegen.chunk.pairs_ok); the backward has no strategy axis. The heuristic runs a bf16 forward
    without a per-key decay paired where it would run two-pass (few long sequences), in the tiles measured there."""
    from mixforge.codegen.config import heuristic_config

    plain = Problem(K=128, V=128, dtype="bf16", decay="none")
    for p in (plain, MAMBA2, Problem(K=64, V=64, dtype="bf16", decay="constant")):
        assert p.pairs and "paired" in gpu_space("chunk_fwd", p).choices("strategy")
        assert any(c.strategy == "paired" for c in gpu_space("chunk_fwd", p).grid())
    for p in (GLA, dataclasses.replace(plain, normalize=True), dataclasses.replace(MAMBA2, bonus=True),
              dataclasses.replace(MAMBA2, inclusive=False), Problem(K=256, V=256, dtype="bf16", decay="scalar")):
        assert not p.pairs and "paired" not in gpu_space("chunk_fwd", p).choices("strategy")
    assert "strategy" not in gpu_space("chunk_bwd", plain).axes
    few_long = heuristic_config("chunk_fwd", 128, 128, "bf16", decay="none", NH=16, T=32768)
    assert few_long == KernelConfig(chunk=64, BV=64, num_warps=4, num_stages=1, strategy="paired")
    assert gpu_space("chunk_fwd", plain).contains(few_long)
    for decay in ("scalar", "constant"):    # a decay per row too, in the same tiles
        assert heuristic_config("chunk_fwd", 128, 128, "bf16", decay=decay, NH=16, T=32768) == few_long
    for decay in ("key", None):             # per-key, or unknown: the per-key tiles, two-pass
        assert heuristic_config("chunk_fwd", 128, 128, "bf16", decay=decay, NH=16, T=32768).strategy == "two_pass"
    assert heuristic_config("chunk_fwd", 128, 128, "bf16", decay="none", NH=256, T=2048).strategy == "fused"
    assert heuristic_config("chunk_fwd", 256, 256, "bf16", decay="none", NH=16, T=32768).strategy != "paired"
