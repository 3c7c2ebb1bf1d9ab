"""benchmarks/decode_bench.py end to end on the CPU (--smoke: Triton's interpreter, tiny shapes, no FLA)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # benchmarks/ sits at the repository root
from benchmarks import decode_bench  # noqa: E402


def test_decode_bench_smoke(tmp_path):
    out = tmp_path / "decode.json"
    assert decode_bench.main(["--smoke", "--steps", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "date", "rows", "copy_bytes_per_s"):
        assert key in doc, key
    rows = doc["rows"]
    for mixer in ("gla", "mamba2"):
        for B in (1, 2):
            got = {r["method"]: r for r in rows if r["mixer"] == mixer and r["B"] == B}
            assert {"floor", "ops.step", "decoder", "decoder.run", "decoder eager", "check decoder vs ops.step",
                    "sweep decoder.run"} <= set(got), sorted(got)
            assert got["check decoder vs ops.step"]["ok"]
            assert got["decoder"]["us_per_step"] > 0 and got["floor"]["floor_us"] > 0
            assert got[f"fla {decode_bench.FLA[mixer][1]}"]["missing"]
