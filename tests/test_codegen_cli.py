"""`mixforge emit SPEC --out DIR`."""
import ast

from mixforge.cli import main


def test_emit_writes_a_readable_module(tmp_path, capsys):
    assert main(["emit", "gla", "--out", str(tmp_path / "out"), "--kernel", "recurrent_fwd"]) == 0
    text = (tmp_path / "out" / "gla.py").read_text()
    ast.parse(text)
    out = capsys.readouterr().out
    assert "wrote" in out and "recurrent_bwd_kernel" in out and "def recurrent_fwd_kernel(" in out
    assert text.startswith('"""Triton kernels for the mixer gla')


def test_emit_from_a_spec_file(tmp_path, capsys):
    spec = tmp_path / "mine.py"
    spec.write_text("from mixforge import Input, Mixer\nfrom mixforge.functions import relu\n"
                    "m = Mixer('mine', fq=relu(Input('q')), fk=Input('k'), fv=Input('v', dim='value'))\n")
    assert main(["emit", f"{spec}:m", "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "mine.py").read_text().count("def chain_kernel(") == 1


def test_emit_errors(tmp_path, capsys):
    assert main(["emit", "no_such_mixer", "--out", str(tmp_path)]) == 2
    assert "unknown mixer" in capsys.readouterr().err
    assert main(["emit", "gla", "--out", str(tmp_path), "--kernel", "nope"]) == 2
