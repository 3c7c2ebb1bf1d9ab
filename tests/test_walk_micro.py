"""benchmarks/walk_micro.py on the CPU (--smoke): every walk variant the GPU experiment times computes the
chunk states it claims to, so that its timings compare like with like."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # benchmarks/ sits at the repository root
from benchmarks import walk_micro  # noqa: E402


def test_walk_variants_agree_with_the_float64_walk(tmp_path):
    assert walk_micro.main(["--smoke", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("walk_micro-*.json")
    doc = json.loads(path.read_text())
    assert {"device", "torch", "triton", "date", "rows", "shape"} <= set(doc)
    assert [r["variant"] for r in doc["rows"]] == list(walk_micro.VARIANTS)
    assert all(r["rel_err"] < 2e-3 for r in doc["rows"]), doc["rows"]
    assert doc["renorms"] > 0      # frame_renorm's branch ran


def test_walk_reference_decays():
    """The reference itself, by hand: chunks of two rows of ones, chunk decay 0.5. S^(2) is 2 + 2 = 4 without
    the decay and 0.5 * 2 + 2 = 3 with it (S^(c) is the state before chunk c)."""
    import torch

    kd, v = torch.ones(6, 1, 1), torch.ones(6, 1, 1)
    dl = torch.full((3, 1), 0.5)
    assert walk_micro.reference(kd, v, dl, False).flatten().tolist() == [0.0, 2.0, 4.0]
    assert walk_micro.reference(kd, v, dl, True).flatten().tolist() == [0.0, 2.0, 3.0]
