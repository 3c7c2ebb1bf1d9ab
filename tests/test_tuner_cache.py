"""Keys and buckets, the JSON config cache (atomic, corruption-proof) and the runtime lookup order."""
import dataclasses
import json
import pickle
import warnings

import pytest

from mixforge.codegen.config import KernelConfig, ShapeKey
from mixforge.tuner import cache as cache_mod
from mixforge.tuner.cache import CacheFormatError, CacheWarning, ConfigCache
from mixforge.tuner.keys import DeviceId, TuneKey, bucket, dtype_name, make_key
from mixforge.tuner.lookup import TunedLookup

DEV = DeviceId("NVIDIA H100 80GB HBM3", "9.0")


def key(T=4096, B=4, H=16, K=128, V=128, kernel="chunk_fwd", dtype="bf16", mixer="abc123", triton="3.6.0",
        source="src1", device=DEV):
    return make_key(mixer, kernel, dtype, B, T, H, K, V, device=device, triton=triton, source=source)


def put(c: ConfigCache, k: TuneKey, chunk=64, ms=1.0):
    return c.put(k, KernelConfig(chunk=chunk), ms, baseline_ms=2 * ms, mixer_name="gla",
                 trials={"target": 10, "evaluated": 10})


# --------------------------------------------------------------------------- keys

def test_buckets_are_powers_of_four():
    assert [bucket(n) for n in (1, 2, 4, 5, 16, 17, 3000, 4096, 4097)] == [1, 4, 4, 16, 16, 64, 4096, 4096, 16384]


def test_dynamic_shapes_within_a_bucket_share_a_key():
    assert key(T=3000) == key(T=4096) == key(T=1025)
    assert key(T=4097) != key(T=4096)
    assert key(B=4, H=16) == key(B=2, H=32) == key(B=1, H=64)
    assert key(B=8, H=16) != key(B=4, H=16)
    # everything else is exact
    for other in (key(K=64), key(V=64), key(dtype="fp16"), key(kernel="chunk_bwd"), key(mixer="zzz"),
                  key(triton="3.7.0"), key(source="src2"), key(device=DeviceId("NVIDIA A100", "8.0"))):
        assert other != key() and str(other) != str(key())
    k = key()
    assert TuneKey.from_dict(json.loads(json.dumps(k.to_dict()))) == k
    assert "T<=4096" in str(k) and "BH<=64" in str(k) and "sm9.0" in str(k)


@pytest.mark.parametrize("text, name", [("bf16", "bf16"), ("bfloat16", "bf16"), ("torch.bfloat16", "bf16"),
                                        ("float32", "fp32"), ("fp16", "fp16"), ("half", "fp16")])
def test_dtype_spellings(text, name):
    assert dtype_name(text) == name


def test_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_name("int8")


# --------------------------------------------------------------------------- the file

def test_put_get_and_reload(tmp_path):
    c = ConfigCache(tmp_path / "configs.json")
    put(c, key(), chunk=32)
    again = ConfigCache(tmp_path / "configs.json")
    e = again.get(key(T=2000))
    assert KernelConfig.from_dict(e["config"]) == KernelConfig(chunk=32)
    assert e["time_ms"] == 1.0 and e["key"]["T_bucket"] == 4096
    put(c, key(), chunk=128)  # same key: replaced
    assert KernelConfig.from_dict(ConfigCache(c.path).get(key())["config"]).chunk == 128
    assert len(ConfigCache(c.path).entries()) == 1


def test_a_crash_mid_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    c = ConfigCache(tmp_path / "configs.json")
    put(c, key(), chunk=32)
    before = c.path.read_bytes()

    def crash(obj, f, **kw):  # the process dies after writing half the document
        f.write(json.dumps(obj)[:40])
        f.flush()
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(cache_mod.json, "dump", crash)
    with pytest.raises(KeyboardInterrupt):
        put(c, key(T=16384), chunk=128)
    monkeypatch.undo()
    assert c.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert list(ConfigCache(c.path).entries()) == [str(key())]


def test_a_crash_before_the_rename_leaves_the_old_file_intact(tmp_path, monkeypatch):
    c = ConfigCache(tmp_path / "configs.json")
    put(c, key(), chunk=32)
    before = c.path.read_bytes()
    monkeypatch.setattr(cache_mod.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        put(c, key(T=16384), chunk=128)
    monkeypatch.undo()
    assert c.path.read_bytes() == before
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


@pytest.mark.parametrize("content", [
    b"{not json",
    b'{"entries": {}}',                                   # foreign: no format marker
    b'{"format": "something-else", "version": 1, "entries": {}}',
    b'{"format": "mixforge-tuned-configs", "version": 99, "entries": {}}',
    b'[1, 2, 3]',
    pickle.dumps({"format": "mixforge-tuned-configs"}),   # never unpickled
    b"\xff\xfe\x00garbage",
])
def test_corrupt_or_foreign_files_are_reported_and_ignored(tmp_path, content):
    path = tmp_path / "configs.json"
    path.write_bytes(content)
    c = ConfigCache(path)
    with pytest.warns(CacheWarning, match=str(path).replace("\\", "\\\\")):
        assert c.entries() == {}
    lookup = TunedLookup(user=ConfigCache(path), shipped=[])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        assert lookup(  "abc123", ShapeKey("chunk_fwd", "bf16", 4, 4096, 16, 128, 128)) is None
    # writing moves the unreadable file aside (reported) and starts a fresh one
    with pytest.warns(CacheWarning):
        put(c, key())
    assert list(ConfigCache(path).entries()) == [str(key())]
    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == content


def test_invalid_entries_are_skipped_and_reported(tmp_path):
    c = ConfigCache(tmp_path / "configs.json")
    put(c, key())
    doc = json.loads(c.path.read_text())
    good = doc["entries"][str(key())]
    doc["entries"]["bogus"] = {**good}                                  # key fields do not spell its name
    doc["entries"][str(key(T=16384))] = {**good, "key": key(T=16384).to_dict(), "config": {"chunk": "big"}}
    doc["entries"][str(key(T=64))] = {**good, "key": key(T=64).to_dict(), "config": {"evil": 1}}
    doc["entries"][str(key(T=256))] = {**good, "key": key(T=256).to_dict(), "time_ms": -1}
    c.path.write_text(json.dumps(doc))
    with pytest.warns(CacheWarning, match="4 invalid entries"):
        assert list(ConfigCache(c.path).entries()) == [str(key())]


def test_export_import_round_trip_and_rejection(tmp_path):
    a = ConfigCache(tmp_path / "a.json")
    put(a, key(), chunk=32)
    put(a, key(kernel="chunk_bwd"), chunk=64)
    assert a.export(tmp_path / "out.json") == 2
    b = ConfigCache(tmp_path / "b.json")
    put(b, key(), chunk=128)
    what = b.import_file(tmp_path / "out.json")
    assert sorted(what.values()) == ["added", "replaced"]
    assert ConfigCache(b.path).entries() == ConfigCache(a.path).entries()
    assert set(b.import_file(tmp_path / "out.json").values()) == {"unchanged"}
    (tmp_path / "foreign.json").write_text('{"some": "other tool"}')
    with pytest.raises(CacheFormatError, match="not a mixforge tuned-config file"):
        b.import_file(tmp_path / "foreign.json")
    doc = json.loads((tmp_path / "out.json").read_text())
    doc["entries"][str(key())]["config"]["num_warps"] = "many"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    before = b.path.read_bytes()
    with pytest.raises(CacheFormatError, match="nothing imported"):
        b.import_file(tmp_path / "bad.json")
    assert b.path.read_bytes() == before


# --------------------------------------------------------------------------- lookup

def test_lookup_order_user_then_shipped_then_nearest_then_heuristic(tmp_path, monkeypatch):
    import mixforge.tuner.lookup as lk

    monkeypatch.setattr(lk, "make_key", lambda mh, kernel, dt, B, T, H, K, V: key(
        T=T, B=B, H=H, K=K, V=V, kernel=kernel, dtype=dt, mixer=mh))
    user, shipped = ConfigCache(tmp_path / "user.json"), ConfigCache(tmp_path / "shipped.json")
    look = TunedLookup(user=user, shipped=[shipped], autotune=False)
    sk = ShapeKey("chunk_fwd", "bf16", 4, 4096, 16, 128, 128)
    assert look.resolve("abc123", sk).source == "heuristic" and look("abc123", sk) is None
    put(shipped, key(T=65536), chunk=16)
    look.invalidate()
    assert look.resolve("abc123", sk).source == "shipped-nearest" and look("abc123", sk).chunk == 16
    put(user, key(T=256), chunk=32)            # as far from T = 4096 as the shipped T = 65536: the user's
    look.invalidate()
    assert look.resolve("abc123", sk).source == "user-nearest" and look("abc123", sk).chunk == 32
    put(shipped, key(T=16384), chunk=128)      # a nearer shipped bucket beats a farther user one
    look.invalidate()
    assert look.resolve("abc123", sk).source == "shipped-nearest" and look("abc123", sk).chunk == 128
    put(shipped, key(), chunk=64)
    look.invalidate()
    assert look.resolve("abc123", sk).source == "shipped" and look("abc123", sk).chunk == 64
    put(user, key(), chunk=128)
    look.invalidate()
    r = look.resolve("abc123", sk)
    assert r.source == "user" and r.config.chunk == 128
    # other hard fields never borrow a config
    assert look("abc123", ShapeKey("chunk_fwd", "bf16", 4, 4096, 16, 64, 128)) is None
    assert look("zzz", sk) is None
    assert look("abc123", ShapeKey("chunk_bwd", "bf16", 4, 4096, 16, 128, 128)) is None


def test_a_template_edit_keeps_tuned_configs_in_use_but_prefers_the_current_source(tmp_path, monkeypatch):
    """Shipped defaults are keyed by the template hash of the day they were tuned; a later edit (a rounding
    fix) must not send every zoo mixer back to the heuristic tiles, yet a config tuned on today's source wins
    among equally near buckets."""
    import mixforge.tuner.lookup as lk

    monkeypatch.setattr(lk, "make_key", lambda mh, kernel, dt, B, T, H, K, V: key(
        T=T, B=B, H=H, K=K, V=V, kernel=kernel, dtype=dt, mixer=mh, source="src2"))
    shipped = ConfigCache(tmp_path / "shipped.json")
    look = TunedLookup(user=ConfigCache(tmp_path / "user.json"), shipped=[shipped], autotune=False)
    sk = ShapeKey("chunk_fwd", "bf16", 4, 4096, 16, 128, 128)
    put(shipped, key(source="src1"), chunk=16)
    r = look.resolve("abc123", sk)
    assert r.source == "shipped-nearest" and r.config.chunk == 16 and r.key.source == "src1"
    put(shipped, key(source="src2", T=65536), chunk=32)   # current source, farther bucket: the nearer one wins
    look.invalidate()
    r = look.resolve("abc123", sk)
    assert r.config.chunk == 16 and r.key.source == "src1"
    # at T = 16384 both are one bucket away: the current source's
    r = look.resolve("abc123", ShapeKey("chunk_fwd", "bf16", 4, 16384, 16, 128, 128))
    assert r.config.chunk == 32 and r.key.source == "src2"


def test_among_equally_near_entries_of_earlier_sources_the_latest_tuned_wins(tmp_path, monkeypatch):
    """One bucket gathers entries tuned on several earlier templates (each edit changes the source); none is
    today's, so the latest tuned, not the first stored, answers, whichever order the file holds them in."""
    import mixforge.tuner.lookup as lk

    monkeypatch.setattr(lk, "make_key", lambda mh, kernel, dt, B, T, H, K, V: key(
        T=T, B=B, H=H, K=K, V=V, kernel=kernel, dtype=dt, mixer=mh, source="src9"))
    sk = ShapeKey("chunk_fwd", "bf16", 4, 4096, 16, 128, 128)
    for order in ((("src1", "2026-11-22T13:32:43+00:00", 64), ("src2", "2026-11-23T02:30:19+00:00", 128)),
                  (("src2", "2026-11-23T02:30:19+00:00", 128), ("src1", "2026-11-22T13:32:43+00:00", 64))):
        user = ConfigCache(tmp_path / f"user-{order[0][0]}.json")
        for source, created, chunk in order:
            user.put(key(source=source), KernelConfig(chunk=chunk), 1.0, created=created)
        look = TunedLookup(user=user, shipped=[], autotune=False)
        r = look.resolve("abc123", sk)
        assert (r.source, r.key.source, r.config.chunk) == ("user-nearest", "src2", 128), order
    # an entry without a creation time sorts after every dated one
    assert lk._recency({}) > lk._recency({"created": "2020-01-01T00:00:00+00:00"})


def test_a_nearest_bucket_forward_runs_two_pass_where_fused_would_idle(tmp_path, monkeypatch):
    """A fused forward tuned at B = 1, H = 16, T = 8192 walks each sequence in one program per value block; at
    T = 32768 that is 32 programs on 132 SMs walking 512 chunks each, so the borrowed config switches to the
    two-pass strategy. The exact bucket's own tuned config is never changed."""
    import mixforge.tuner.lookup as lk

    monkeypatch.setattr(lk, "make_key", lambda mh, kernel, dt, B, T, H, K, V: key(
        T=T, B=B, H=H, K=K, V=V, kernel=kernel, dtype=dt, mixer=mh))
    shipped = ConfigCache(tmp_path / "shipped.json")
    put(shipped, key(B=1, T=8192), chunk=64)           # fused, BV 64 (KernelConfig's defaults)
    look = TunedLookup(user=ConfigCache(tmp_path / "user.json"), shipped=[shipped], autotune=False)
    long_few = ShapeKey("chunk_fwd", "bf16", 1, 32768, 16, 128, 128)
    assert look.resolve("abc123", long_few).source == "shipped-nearest"
    assert look("abc123", long_few).strategy == "two_pass" and look("abc123", long_few).chunk == 64
    assert look("abc123", ShapeKey("chunk_fwd", "bf16", 1, 8192, 16, 128, 128)).strategy == "fused"   # exact
    put(shipped, key(kernel="chunk_bwd", B=1, T=8192), chunk=64)
    assert look("abc123", ShapeKey("chunk_bwd", "bf16", 1, 32768, 16, 128, 128)).strategy == "fused"  # no such axis


def test_a_forward_borrows_only_from_its_walk_regime(tmp_path, monkeypatch):
    """Few long sequences (a fused forward's walks would idle: codegen.config.walks_idle) and many are tuned
    apart: a forward tuned at B = 4, T = 4096 does not serve B = 1, T = 32768 (the heuristic does, fitted to
    that shape), nor one tuned at B = 1 a call at B = 16; each still serves its own side, the backward both.
    The tuned shape decides, or without one the entry's buckets; a bucket of B*H can span both sides, and so
    the memo tells them apart."""
    import mixforge.tuner.lookup as lk

    monkeypatch.setattr(lk, "make_key", lambda mh, kernel, dt, B, T, H, K, V: key(
        T=T, B=B, H=H, K=K, V=V, kernel=kernel, dtype=dt, mixer=mh))
    many, few = ShapeKey("chunk_fwd", "bf16", 4, 4096, 16, 128, 128), ShapeKey("chunk_fwd", "bf16", 1, 32768, 16, 128, 128)
    shipped = ConfigCache(tmp_path / "shipped.json")
    shipped.put(key(B=4, T=4096), KernelConfig(chunk=32), 1.0, shape=[4, 4096, 16, 128, 128])
    look = TunedLookup(user=ConfigCache(tmp_path / "user.json"), shipped=[shipped], autotune=False)
    assert look.resolve("abc123", few).source == "heuristic" and look("abc123", few) is None
    assert look.resolve("abc123", dataclasses.replace(many, B=16, T=2048)).source == "shipped-nearest"
    shipped.put(key(kernel="chunk_bwd", B=4, T=4096), KernelConfig(chunk=32), 1.0, shape=[4, 4096, 16, 128, 128])
    look.invalidate()
    assert look.resolve("abc123", dataclasses.replace(few, kernel="chunk_bwd")).source == "shipped-nearest"
    # an entry of the other side, tuned at B = 1 (shape) or only bucketed there (no shape)
    shipped.put(key(B=1, T=8192), KernelConfig(chunk=128), 1.0, shape=[1, 8192, 16, 128, 128])
    look.invalidate()
    assert look("abc123", few).chunk == 128
    assert look("abc123", dataclasses.replace(many, B=16, T=2048)).chunk == 32
    # one bucket of B*H (17-64), both sides: 32 sequence-heads idle at T = 4096, 64 do not
    assert lk._same_walk_regime(ShapeKey("chunk_fwd", "bf16", 2, 4096, 16, 128, 128),
                                {"key": key(B=1, T=8192).to_dict()}) is True
    assert lk._same_walk_regime(ShapeKey("chunk_fwd", "bf16", 4, 4096, 16, 128, 128),
                                {"key": key(B=1, T=8192).to_dict()}) is False
    user = ConfigCache(tmp_path / "user2.json")
    user.put(key(B=2, T=4096), KernelConfig(chunk=16), 1.0, shape=[2, 4096, 16, 128, 128])
    look = TunedLookup(user=user, shipped=[], autotune=False)
    assert look.resolve("abc123", ShapeKey("chunk_fwd", "bf16", 2, 4096, 16, 128, 128)).source == "user"
    assert look.resolve("abc123", ShapeKey("chunk_fwd", "bf16", 3, 3000, 16, 128, 128)).source == "user"  # exact key
    assert look.resolve("abc123", ShapeKey("chunk_fwd", "bf16", 4, 16384, 16, 128, 128)).source == "heuristic"
    assert look.resolve("abc123", ShapeKey("chunk_fwd", "bf16", 2, 16384, 16, 128, 128)).source == "user-nearest"


def test_heuristic_forward_strategy_follows_sequences_and_length():
    from mixforge.codegen.config import heuristic_config

    few_long = heuristic_config("chunk_fwd", 128, 128, "fp32", decay="scalar", NH=16, T=32768)
    assert few_long.strategy == "two_pass"
    assert heuristic_config("chunk_fwd", 128, 128, "fp32", decay="scalar", NH=256, T=2048).strategy == "fused"
    assert heuristic_config("chunk_fwd", 128, 128, "fp32", decay="scalar").strategy == "fused"   # sizes unknown
    assert dataclasses.replace(few_long, strategy="fused") == heuristic_config("chunk_fwd", 128, 128, "fp32",
                                                                              decay="scalar")
    # in bf16 a few long sequences take the paired forward (codegen.config.fit_pairs)
    assert heuristic_config("chunk_fwd", 128, 128, "bf16", decay="scalar", NH=16, T=32768).strategy == "paired"


def test_shipped_defaults_are_valid_cache_files():
    from mixforge.tuner.lookup import shipped_caches

    caches = shipped_caches()
    assert caches, "tuner/defaults/*.json must ship"
    for c in caches:
        text = c.path.read_text()
        entries, problems = cache_mod.parse_document(text, str(c.path))
        assert problems == []


def test_lookup_skips_configs_the_kernels_would_reject(tmp_path, monkeypatch):
    import mixforge.tuner.lookup as lk

    monkeypatch.setattr(lk, "make_key", lambda mh, kernel, dt, B, T, H, K, V: key(
        T=T, B=B, H=H, K=K, V=V, kernel=kernel, dtype=dt, mixer=mh))
    user, shipped = ConfigCache(tmp_path / "user.json"), ConfigCache(tmp_path / "shipped.json")
    user.put(key(), KernelConfig(chunk=32, sub_chunk=64), 1.0)   # hand-edited: 32 is not a multiple of 64
    put(shipped, key(), chunk=64)
    look = TunedLookup(user=user, shipped=[shipped], autotune=False)
    r = look.resolve("abc123", ShapeKey("chunk_fwd", "bf16", 4, 4096, 16, 128, 128))
    assert r.source == "shipped" and r.config.chunk == 64


def test_front_door_lookup_traces_under_torch_compile(tmp_path, monkeypatch):
    """Ops call the lookup on every call, also inside torch.compile(fullgraph=True), static or dynamic."""
    import torch

    import mixforge as mf
    from mixforge.spec.shapes import CallShapes
    from mixforge.tuner.lookup import default_lookup

    monkeypatch.setenv("MIXFORGE_CACHE_DIR", str(tmp_path))
    default_lookup().invalidate()
    gla = mf.zoo.gla
    for T, chunk in ((8, 8), (2048, 32)):
        ConfigCache().put(make_key(gla.content_hash, "chunk_fwd", "fp32", 2, T, 2, 16, 16),
                          KernelConfig(chunk=chunk, sub_chunk=8, BV=16), 1.0)

    ops = mf.compile(gla)

    def f(x):
        B, T = x.shape
        return x * ops.config("chunk_fwd", CallShapes(B, T, 2, 16, 16, B, (), torch.float32, x.device, False)).chunk

    assert f(torch.ones(2, 8)).max() == 8   # eager: the exact bucket
    for dynamic in (False, True):
        torch._dynamo.reset()
        g = torch.compile(f, backend="eager", fullgraph=True, dynamic=dynamic)
        assert g(torch.ones(2, 8)).max() == 32  # traced: the bucket nearest to T=4096
        assert g(torch.ones(2, 40)).max() == 32
    torch._dynamo.reset()
    default_lookup().invalidate()


def test_heuristic_recurrent_value_blocks_follow_sequence_heads():
    """The recurrent walks take all of V in one program (the backward's per-block sums then need one buffer,
    not one per block), narrowed towards 128 programs when there are few sequence-heads, never below 32."""
    from mixforge.codegen.config import heuristic_config, KernelConfig

    def bv(kernel, NH, K=128, V=128):
        cfg = heuristic_config(kernel, K, V, "bf16", decay="key", NH=NH, T=2048)
        assert isinstance(cfg, KernelConfig) and (cfg.num_warps, cfg.num_stages) == (4, 1)
        return cfg.BV

    assert [bv("recurrent_fwd", NH) for NH in (-1, 256, 128, 64, 16, 1)] == [128, 128, 128, 64, 32, 32]
    assert bv("recurrent_bwd", 64) == 64
    assert bv("recurrent_fwd", 256, K=128, V=96) == 128       # padded to a power of two: one block
    assert bv("recurrent_bwd", 256, K=64, V=256) == 128       # never wider than the measured 128
    # K > 128 keeps the narrow tiles (the state alone would fill a 4-warp program's registers)
    assert heuristic_config("recurrent_fwd", 256, 256, "bf16", decay="key", NH=256).BV == 32
    from mixforge.tuner.space import H100, Problem, build_space
    for kernel in ("recurrent_fwd", "recurrent_bwd"):   # points of the tuner's space
        cfg = heuristic_config(kernel, 128, 128, "bf16", decay="key", NH=256)
        assert build_space(kernel, Problem(K=128, V=128, dtype="bf16", decay="key"), limits=H100,
                           interpret=False).check(cfg, estimate=False) == []
