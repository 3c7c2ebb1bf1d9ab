"""benchmarks/ablate.py, recurrent_bench.py, keyblock_bench.py and strategy_bench.py on the CPU (--smoke, or
chunk_bench's dry mode): every variant the GPU runs renders, compiles and runs, and changes what it claims to
change (or, for configs, agrees)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # benchmarks/ sits at the repository root
from benchmarks import ablate, chunk_bench, keyblock_bench, recurrent_bench, strategy_bench  # noqa: E402


def _rows(tmp_path, prefix):
    (path,) = tmp_path.glob(f"{prefix}-*.json")
    doc = json.loads(path.read_text())
    assert {"torch", "date", "rows", "shape"} <= set(doc)
    return doc["rows"]


@pytest.mark.parametrize("mixer,kernel", [("scalar_decay", "chunk_fwd_kernel"),
                                          ("gla_recurrent", "recurrent_fwd_kernel"),
                                          ("mamba2", "chunk_states_kernel"),
                                          ("mamba2", "chunk_dstates_kernel"),
                                          ("linear_attention", "chunk_states_kernel/tiles"),
                                          ("linear_attention", "chunk_bwd_kernel")])
def test_every_ablation_edits_the_kernel_it_names(tmp_path, mixer, kernel):
    assert ablate.main(["--smoke", "--out", str(tmp_path), "--mixer", mixer, "--kernel", kernel]) == 0
    rows = {r["variant"]: r["rel_to_baseline"] for r in _rows(tmp_path, "ablate")}
    assert list(rows) == list(ablate.ABLATIONS[kernel])
    for name, rel in rows.items():
        if name == "baseline":
            assert rel == 0.0
        elif name in ablate.SAME_OUTPUT:    # the same sums reordered or loaded earlier, not a removal
            assert rel < 1e-5
        else:                            # the edit took: the (deliberately wrong) output moved
            assert rel > 1e-3, name


def test_an_edit_that_no_longer_matches_fails_loudly():
    src = "@triton.jit\ndef k(\n    x = 1\n@triton.jit\ndef other(\n    x = 1\n"
    assert ablate.patch_kernel(src, "k", [("x = 1", "x = 2")]).count("x = 2") == 1   # k only, not other
    with pytest.raises(SystemExit, match="is not in k"):
        ablate.patch_kernel(src, "k", [("y = 1", "y = 2")])


def test_recurrent_bench_configs_agree(tmp_path):
    assert recurrent_bench.main(["--smoke", "--out", str(tmp_path), "--configs", "64,4,2", "32,2,1"]) == 0
    rows = _rows(tmp_path, "recurrent_bench")
    assert [r["config"] for r in rows] == ["16,4,2", "16,2,1"]     # the smoke shapes' tiles
    assert all(r["rel_y"] < 1e-5 and r["rel_grads"] < 1e-5 for r in rows), rows


@pytest.mark.parametrize("kernel", ["chunk_bwd", "chunk_fwd"])
def test_keyblock_bench_configs_agree(tmp_path, kernel):
    """All of K against key blocks (three at K = 40), the backward's or the forward's config pinned; and the
    two-pass forward in key blocks (its output kernel for mamba2's decay per row)."""
    assert keyblock_bench.main(["--smoke", "--out", str(tmp_path), "--cases", "gla,mamba2", "--kernel", kernel]) == 0
    rows = _rows(tmp_path, "keyblock_bench")
    assert [(r["case"], r["config"]) for r in rows] == [(c, k) for c in ("gla", "mamba2")
                                                        for k in ("16,16,4,1,0", "16,16,4,1,16", "16,16,4,1,16,t")]
    assert all(r["rel_y"] < 1e-5 and max(r["rel_grads"].values()) < 1e-5 for r in rows), rows
    assert all(f"{'fwd' if kernel == 'chunk_fwd' else 'fwd+bwd'}_ms" in r for r in rows)


def test_forced_walk_sets_the_walk_and_restores_the_rule():
    from benchmarks.chunk_bench import forced_walk
    from mixforge.codegen import chunk as chunk_path
    real = chunk_path.walk_keys, chunk_path.walk_factors

    class C:    # the fields the rule reads
        decay, normalize = "scalar", False
    with forced_walk("factors"):
        assert chunk_path.walk_keys(C, True, 64, 32, 32) and chunk_path.walk_factors(C, 32, 32)
        assert not chunk_path.walk_keys(C, False, 64, 32, 32)      # only split walks read a pass
    with forced_walk("keys"):
        assert chunk_path.walk_keys(C, True, 64, 32, 32) and not chunk_path.walk_factors(C, 32, 32)
    with forced_walk("step"):
        assert not chunk_path.walk_keys(C, True, 64, 32, 32)
    assert (chunk_path.walk_keys, chunk_path.walk_factors) == real


def test_strategy_bench_unsplit_sweep_and_walk_launch(tmp_path, monkeypatch):
    """--sweep-states unsplit runs at the backward's chunk and its states agree (on the interpreter the tiles
    clamp to 64 and the launches are ignored: this is the plumbing, not the tiles); --walk-launch is recorded
    and, like --split-launch, undone when the run ends (the launch constants are module globals)."""
    from mixforge.codegen import chunk as cp

    for mod in (chunk_bench, strategy_bench):
        monkeypatch.setattr(mod, "DRY", True)
    monkeypatch.setattr(chunk_bench, "DEV", "cpu")
    before = cp.SPLIT_LAUNCH, cp.SPLIT_LAUNCH_NO_DECAY, cp.WALK_LAUNCH
    assert strategy_bench.main(["--out", str(tmp_path), "--mixers", "mamba2", "--shapes", "4,8192,16",
                                "--sweep-states", "unsplit", "--sweep-config", "chunk_bwd"]) == 0
    doc = json.loads(next(tmp_path.glob("strategy_bench-*.json")).read_text())
    assert {"device", "torch", "triton", "date"} <= set(doc)
    (row,) = doc["rows"]
    assert row["config"] == "chunk_bwd" and "error" not in row, row
    assert len(row["states"]) > 1 and all(v["diff"] < 1e-6 for v in row["states"].values()), row["states"]
    for p in tmp_path.glob("strategy_bench-*.json"):
        p.unlink()
    assert strategy_bench.main(["--out", str(tmp_path), "--mixers", "linear_attention", "--shapes", "4,8192,16",
                                "--forwards", "two_pass", "--walk-launch", "4,3", "--split-launch", "2,2"]) == 0
    doc = json.loads(next(tmp_path.glob("strategy_bench-*.json")).read_text())
    assert (doc["walk_launch"], doc["split_launch"]) == ("4,3", "2,2")
    (row,) = doc["rows"]
    assert "error" not in row and row["diff"]["bwd_split"] < 1e-6, row
    assert (cp.SPLIT_LAUNCH, cp.SPLIT_LAUNCH_NO_DECAY, cp.WALK_LAUNCH) == before
