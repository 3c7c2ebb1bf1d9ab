"""benchmarks.plot_compare: the PNG and the README table from a compare result (no GPU needed)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import plot_compare  # noqa: E402


def _result(tmp_path):
    rows = []
    for T, B in ((2048, 16), (8192, 4), (32768, 1)):
        for p, ms, peer in (("fwd", 0.4, 0.5), ("fwd+bwd", 2.0, 2.2)):
            rows.append(dict(mixer="gla", peer="fla.chunk_gla", B=B, T=T, H=16, K=128, V=128, dtype="bfloat16",
                             **{"pass": p}, ms=ms, peer_ms=peer, ratio=peer / ms, peak_bytes=3 << 20,
                             peer_peak_bytes=4 << 20, agrees=True,
                             **({"roofline_ms": 0.2, "roofline_fraction": 0.5} if p == "fwd" else {})))
            rows.append(dict(mixer="gla", peer="torch.sdpa", B=B, T=T, H=16, K=128, V=128, **{"pass": p}, ms=ms,
                             peer_ms=1.0, ratio=1.0 / ms, peak_bytes=1, peer_peak_bytes=1))
    rows.append(dict(mixer="scalar_decay", peer="fla.chunk_simple_gla", B=16, T=2048, H=16, K=128, V=128,
                     **{"pass": "fwd+bwd"}, ms=3.0, peer_error="RuntimeError: refuses (Triton miscompile)"))
    rows.append(dict(mixer="mamba2", B=16, T=2048, K=128, V=128, error="Traceback ..."))
    path = tmp_path / "compare-x.json"
    path.write_text(json.dumps({"device": "H100", "torch": "2.11", "triton": "3.6", "date": "2026-11-22",
                                "rows": rows}))
    return path


def test_plot_and_markdown(tmp_path, capsys):
    path = _result(tmp_path)
    assert plot_compare.main([str(path), "--markdown"]) == 0
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| gla | fla.chunk_gla | 16 | 2048 | 128 | fwd | 0.400 | 0.500 | 1.25 | 3 / 4 | 50% |" in table
    assert "| scalar_decay | fla.chunk_simple_gla | 16 | 2048 | 128 | fwd+bwd | 3.000 | refuses |" in table
    assert "| mamba2 |" in table and "error" in table


def test_merged_results_keep_each_row_of_the_latest_run(tmp_path, capsys):
    """A run cut short, completed by a later one: the later file's rows replace the same rows, the others
    stay, and the table names each row's run."""
    early = _result(tmp_path)
    doc = json.loads(early.read_text())
    late_row = dict(next(r for r in doc["rows"] if r.get("peer") == "fla.chunk_gla" and r["B"] == 16
                         and r["pass"] == "fwd"), ms=0.25, ratio=2.0)
    late = tmp_path / "compare-y.json"
    late.write_text(json.dumps(dict(doc, date="2026-11-23", rows=[late_row])))
    assert plot_compare.main([str(early), str(late), "--markdown", "--out", str(tmp_path / "m.png")]) == 0
    table = capsys.readouterr().out
    assert "| gla | fla.chunk_gla | 16 | 2048 | 128 | fwd | 0.250 | 0.500 | 2.00 | 3 / 4 | 50% | compare-y |" in table
    assert "| gla | fla.chunk_gla | 16 | 2048 | 128 | fwd | 0.400 |" not in table      # replaced, not repeated
    assert "| gla | fla.chunk_gla | 4 | 8192 | 128 | fwd | 0.400 | 0.500 | 1.25 | 3 / 4 | 50% | compare-x |" in table
    merged = plot_compare.merge([early, late])
    assert merged["runs"] == ["compare-x", "compare-y"] and merged["date"] == "2026-11-23"
    assert len(merged["rows"]) == len(doc["rows"])


def test_not_a_compare_result(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="not a benchmarks.compare result"):
        plot_compare.main([str(bad)])


def test_compare_helpers_without_a_gpu():
    from benchmarks import compare

    assert compare._parse_shapes("16,2048,128,128; 8,4096,64,64") == [(16, 2048, 128, 128), (8, 4096, 64, 64)]
    for bad in ("16,2048,128", "a,b,c,d", "", "0,1,1,1"):
        with pytest.raises(SystemExit, match="--shapes"):
            compare._parse_shapes(bad)
    with pytest.raises(SystemExit, match="unknown case"):
        compare._cases({"glaa"})
    assert [c.name for c in compare._cases({"gla", "mamba2"})] == ["gla", "mamba2"]
    rec = next(c for c in compare.CASES if c.path == "recurrent")
    assert compare._shapes_of(rec, compare.SHAPES) == [(16, 2048, 128, 128)]
    ours = [dict(mixer="gla", B=1, T=8, H=2, K=4, V=4, dtype="bfloat16", path="chunk", **{"pass": "fwd"}, ms=2.0,
                 peak_bytes=10), dict(mixer="gla", B=1, T=8, **{"pass": "fwd+bwd"}, error="boom")]
    rows = compare.sdpa_rows(ours, {"fwd": (1.0, 5), "fwd+bwd": (3.0, 7)})
    assert rows == [dict(mixer="gla", B=1, T=8, H=2, K=4, V=4, dtype="bfloat16", path="chunk", **{"pass": "fwd"},
                         ms=2.0, peak_bytes=10, peer="torch.sdpa", peer_ms=1.0, peer_peak_bytes=5, ratio=0.5)]


def test_sdpa_peer_backward_reaches_the_inputs():
    """The inputs get requires_grad after the peer is built (as measure() does): grads must still reach them."""
    import torch

    from benchmarks import compare

    x = {n: torch.randn(1, 8, 2, 4) for n in "qkv"}
    run = compare.peer_sdpa(x, {})
    for t in x.values():
        t.requires_grad_(True)
    y = run()
    compare.fwd_bwd(run, list(x.values()), torch.randn_like(y))()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in x.values())


def test_compare_rows_record_the_config_each_kernel_ran(tmp_path, monkeypatch):
    """benchmarks.compare puts into every row the config of each kernel and where it came from: the
    heuristic where nothing was tuned (on this CPU the shipped H100 defaults do not apply), the user's
    entry once the cache holds one for that shape."""
    import mixforge as mf
    import mixforge.tuner.lookup as lk
    from benchmarks.compare import CASES, configs_used
    from mixforge.codegen.config import KernelConfig, ShapeKey
    from mixforge.spec.testing import random_inputs

    monkeypatch.setenv("MIXFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(lk, "_default", None)
    case = {c.name: c for c in CASES}["gla"]
    ops = mf.compile(case.mixer)
    x = random_inputs(case.mixer, B=1, T=32, H=2, K=16, V=16)
    got = configs_used(case, ops, x)
    assert set(got) == {"chunk_fwd", "chunk_bwd"}
    assert all(r["source"] == "heuristic" and r["config"]["chunk"] >= 8 for r in got.values()), got
    tuned = KernelConfig(**{**got["chunk_fwd"]["config"], "num_warps": 2})
    look = lk.default_lookup()
    look.user.put(look.key_for(case.mixer, ShapeKey("chunk_fwd", "fp32", 1, 32, 2, 16, 16)), tuned, 1.0,
                  baseline_ms=2.0, mixer_name="gla", trials={"target": 1, "evaluated": 1}, shape=[1, 32, 2, 16, 16])
    look.invalidate()
    got = configs_used(case, ops, x)
    assert got["chunk_fwd"] == dict(source="user", config=tuned.to_dict(), tuned_ms=1.0,
                                    tuned_shape=[1, 32, 2, 16, 16]), got
    assert "tuned_ms" not in got["chunk_bwd"]
    assert got["chunk_bwd"]["source"] == "heuristic"


def test_configs_from_an_earlier_run_pin_each_rows_kernels(tmp_path, monkeypatch):
    """--configs-from: the configs an earlier compare's rows recorded run again at those shapes (a fresh machine
    has lost the tuned cache they came from); other shapes and kernels keep the lookup's, and the row says
    which were pinned. A file with no recorded config is refused."""
    import mixforge.tuner.lookup as lk
    from benchmarks import compare
    from mixforge.spec.testing import random_inputs

    monkeypatch.setenv("MIXFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(lk, "_default", None)
    pinned = dict(chunk=16, sub_chunk=8, BK=None, BV=16, num_warps=2, num_stages=1, strategy="two_pass")
    old = tmp_path / "compare-old.json"
    old.write_text(json.dumps({"rows": [
        dict(mixer="gla", B=1, T=32, H=2, K=16, V=16, configs={"chunk_fwd": {"source": "user", "config": pinned},
                                                                "chunk_bwd": {"error": "not recorded"}}),
        dict(mixer="gla", B=1, T=32, H=2, K=16, V=16, error="Traceback ...")]}))
    monkeypatch.setattr(compare, "PINNED", compare.load_pins(str(old)))
    case = {c.name: c for c in compare.CASES}["gla"]
    ops = compare.compile_case(case)
    x = random_inputs(case.mixer, B=1, T=32, H=2, K=16, V=16)
    got = compare.configs_used(case, ops, x)
    assert got["chunk_fwd"] == dict(source="pinned", config=pinned), got
    assert got["chunk_bwd"]["source"] == "heuristic"
    other = compare.configs_used(case, ops, random_inputs(case.mixer, B=2, T=32, H=2, K=16, V=16))
    assert other["chunk_fwd"]["source"] == "heuristic"
    assert bool(ops.chunk(**x)[0].isfinite().all())
    bare = tmp_path / "compare-bare.json"
    bare.write_text(json.dumps({"rows": [dict(mixer="gla", B=1, T=32, H=2, K=16, V=16)]}))
    with pytest.raises(SystemExit, match="no row records a config"):
        compare.load_pins(str(bare))


def test_tune_cases_share_the_time_limit(monkeypatch):
    """Each (case, shape) may use the time left over the items left: the first case cannot spend it all, and
    what an item leaves over goes to the next ones."""
    from benchmarks import compare

    seen = []

    def fake_tune(mixer, shape, dtype, trials, timeout, kernels):
        seen.append((shape, timeout, kernels))
        return []
    monkeypatch.setattr(compare.mf, "tune", fake_tune)
    cases = compare._cases({"gla", "mamba2"})
    shapes = [(16, 2048, 128, 128), (8, 4096, 64, 64)]
    done = compare.tune_cases(cases, shapes, trials=3, time_limit=100.0)
    assert len(seen) == len(done) == 4
    shares = [t for _, t, _ in seen]
    assert 24.0 < shares[0] <= 25.0                      # 100 s over four items
    assert 32.0 < shares[1] <= 100 / 3 and 99.0 < shares[3] <= 100.0   # the fast items left their time over
    assert compare.tune_cases(cases, shapes, trials=3, time_limit=None) and seen[-1][1] is None
    assert seen[-1][2] == ["chunk_fwd", "chunk_bwd"]
    compare.tune_cases(cases, shapes, trials=3, time_limit=None, passes=("fwd",))   # --tune-passes fwd
    assert seen[-1][2] == ["chunk_fwd"]


def test_host_time_helpers_without_a_gpu(monkeypatch):
    """benchmarks.host_time's host clock and profile, on a step that only runs Python (the GPU's
    synchronization stubbed): the time per call and the profile of the step's own function."""
    import time

    import torch
    from benchmarks import host_time

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []

    def issue_one():
        calls.append(1)
        time.sleep(0.002)

    us = host_time.host_us(issue_one, calls=5)
    assert len(calls) == 6 and 2000 <= us < 50000
    text = host_time.host_profile(issue_one, calls=3, top=5)
    assert "issue_one" in text and len(calls) == 10


def test_memory_peak_replays_the_allocation_history():
    """benchmarks.memory_peak's replay of a device trace: the peak of what was allocated, and the blocks alive
    then, named by the innermost project frame and summed per frame."""
    from benchmarks import memory_peak as mp

    def fr(name, line):
        return [{"filename": "/site/torch/nn.py", "line": 1, "name": "inner"},
                {"filename": f"/site/mixforge/codegen/{name}.py", "line": line, "name": name}]
    trace = [dict(action="alloc", addr=1, size=100 << 20, frames=fr("chunk", 10)),
             dict(action="alloc", addr=2, size=50 << 20, frames=fr("chunk", 10)),
             dict(action="free_requested", addr=1, size=100 << 20),
             dict(action="alloc", addr=3, size=120 << 20, frames=fr("chainrule", 5)),   # 170 MiB: the peak
             dict(action="free_requested", addr=2, size=50 << 20),
             dict(action="alloc", addr=4, size=10 << 20, frames=[{"filename": "/x/y.py", "line": 3, "name": "f"}])]
    peak, alive = mp.alive_at_peak(trace)
    assert peak == 170 << 20 and sorted(b["addr"] for b in alive) == [2, 3]
    g = mp.grouped(alive)
    assert [(e["where"], e["MiB"]) for e in g] == [("chainrule.py:5 (chainrule)", 120.0), ("chunk.py:10 (chunk)", 50.0)]
    assert mp.where([{"filename": "/x/y.py", "line": 3, "name": "f"}]) == "y.py:3 (f)"
