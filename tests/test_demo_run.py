"""`mixforge demo` on the CPU: declares, generates, checks, plots, summarises; and degrades clearly without kernels."""
import io
import json

import pytest
from rich.console import Console

import mixforge as mf
from mixforge.cli import main as cli_main
from mixforge.demo import declare_variant, run_demo


def _console():
    buf = io.StringIO()
    return Console(file=buf, width=160, force_terminal=False, color_system=None), buf


def test_demo_generates_checks_and_plots(tmp_path):
    if not hasattr(mf, "compile"):
        pytest.fail("mixforge.compile does not exist: the demo cannot generate kernels")
    con, buf = _console()
    rc = run_demo(str(tmp_path), quick=True, console=con)
    text = buf.getvalue()
    summary = json.loads((tmp_path / "summary.json").read_text())
    res = summary["results"]
    assert "Mixer(\"tied_gla\"" in text or "Mixer('tied_gla'" in text      # the declaration is shown
    assert "generated source:" in text and res["module_path"] in text.replace("\n", "")
    assert {"chunk_fwd", "recurrent_fwd", "step"} <= set(res["kernels"])
    assert (tmp_path / "tied_gla_attention.png").read_bytes()[:4] == b"\x89PNG"
    assert "summary" in text and "decay kind" in text
    for path in ("chunk", "recurrent"):
        assert set(res[path]["grads"]) >= {"q", "a", "v", "g", "u", "S0"}
    failed = {p: res[p] for p in ("chunk", "recurrent")
              if not (res[p]["y"] < 1e-4 and res[p]["state"] < 1e-4 and res[p]["max_grad"] < 1e-3)}
    assert not failed and res["decoding"] < 1e-4 and res["layer"] < 1e-4, failed or res
    assert rc == 0 and summary["ok"] and "all checks passed" in text


def test_demo_without_kernels_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.delattr(mf, "compile", raising=False)
    assert cli_main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "kernels: not yet available" in out
    assert (tmp_path / "tied_gla_attention.png").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["results"]["kernels"] == "not yet available"


def test_variant_is_declared_in_a_few_lines():
    import inspect

    src = inspect.getsource(declare_variant)
    assert len([l for l in src.splitlines() if l.strip() and not l.strip().startswith(('"""', "#"))]) <= 8
    m = declare_variant()
    assert m.decay_kind == "key" and m.bonus is not None
