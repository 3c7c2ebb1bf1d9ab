"""Mixer identity (content hash, equality), description, JSON round trip, loading, and the `show` CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import sympy

import mixforge as mf
from mixforge import Bonus, Input, Mixer, Param, SpecError, load_mixer, s, value
from mixforge.functions import exp, logsigmoid, sigmoid, silu

q, k, a = Input("q"), Input("k"), Input("a")
v, g = Input("v", dim="value"), Input("g", dim="value")
ZOO = sorted(mf.zoo.ALL)


def gla_like(name="gla2", **kw):
    base = dict(fq=q, fk=k, fv=v, fa=logsigmoid(a) / 16, fg=silu(g), norm="rms")
    base.update(kw)
    return Mixer(name, **base)


# --------------------------------------------------------------------------- content hash

def test_same_content_different_name_same_hash():
    m1, m2 = gla_like("one"), gla_like("two", doc="another doc")
    assert m1.content_hash == m2.content_hash == mf.zoo.gla.content_hash
    assert m1 != m2                     # equality includes the name
    assert gla_like("gla") == mf.zoo.gla
    assert hash(gla_like("gla")) == hash(mf.zoo.gla)
    assert len(m1.content_hash) == 16 and int(m1.content_hash, 16) >= 0


def test_fresh_symbols_same_hash():
    """Hash follows content, not object identity: freshly created Inputs give the same hash."""
    m = Mixer("x", fq=Input("q"), fk=Input("k"), fv=Input("v", dim="value"), fa=logsigmoid(Input("a")) / 16,
              fg=silu(Input("g", dim="value")), norm="rms")
    assert m.content_hash == mf.zoo.gla.content_hash


@pytest.mark.parametrize("change", [
    dict(norm="layer"), dict(norm=None), dict(inclusive=False), dict(scale=0.5), dict(scale=1.0),
    dict(fa=logsigmoid(a) / 8), dict(fg=sigmoid(g)), dict(fg=None), dict(fa=None),
    dict(bonus=Bonus(weight=Param("u"))), dict(bonus=Bonus(weight=Param("u"), term=sigmoid(s * value))),
    dict(fk=Input("k", grouped=True)), dict(fv=Input("w", dim="value")), dict(fq=2 * q),
    dict(fa=logsigmoid(a) / 16 + 1e-12 * 0 - sympy.Rational(1, 10 ** 9)),
])
def test_changing_an_option_changes_the_hash(change):
    assert gla_like(**change).content_hash != mf.zoo.gla.content_hash


def test_normalize_changes_the_hash():
    base = dict(fq=exp(q), fk=exp(k), fv=v)
    assert Mixer("x", **base).content_hash != Mixer("x", normalize=True, **base).content_hash


def test_param_vs_input_changes_the_hash():
    m1 = Mixer("x", fq=q, fk=k, fv=v, fa=-exp(Input("w", dim=None)))
    m2 = Mixer("x", fq=q, fk=k, fv=v, fa=-exp(Param("w", dim=None)))
    assert m1.content_hash != m2.content_hash and m1 != m2


def test_float_coefficients_keep_full_precision_in_hash():
    m1 = gla_like(fa=logsigmoid(a) * (1 / 3))
    m2 = gla_like(fa=logsigmoid(a) * 0.333333333333333)
    assert m1.content_hash != m2.content_hash


def test_all_zoo_hashes_distinct():
    hashes = {m.content_hash for m in mf.zoo.ALL.values()}
    assert len(hashes) == len(mf.zoo.ALL)


def test_hash_stable_across_processes():
    code = ("import mixforge as mf, json; "
            "print(json.dumps({n: m.content_hash for n, m in mf.zoo.ALL.items()}))")
    here = {n: m.content_hash for n, m in mf.zoo.ALL.items()}
    # another string-hash seed than this process's (which is random unless PYTHONHASHSEED is set)
    seed = "1" if os.environ.get("PYTHONHASHSEED") == "12345" else "12345"
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == here


# --------------------------------------------------------------------------- describe

def test_describe_shows_the_five_maps_and_options():
    text = mf.zoo.gla.describe()
    lines = text.splitlines()
    assert lines[0].startswith("mixer gla") and "decay: key" in lines[0] and mf.zoo.gla.content_hash in lines[0]
    assert "  fq = q    [key]" in lines
    assert "  fk = k    [key]" in lines
    assert "  fv = v    [value]" in lines
    assert "  fa = logsigmoid(a)/16    [key]" in lines
    assert "  fg = silu(g)    [value]" in lines
    assert "norm=rms" in text and "inclusive=True" in text and "scale=K**-0.5" in text
    assert "operands: q[B,T,H,K], k[B,T,H,K], v[B,T,H,V], a[B,T,H,K], g[B,T,H,V]" in text
    assert str(mf.zoo.gla) == text


def test_describe_defaults_and_bonus():
    text = mf.zoo.linear_attention.describe()
    assert "fa = 0 (no decay)" in text and "fg = 1 (no gate)" in text and "normalize=True" in text
    text = mf.zoo.rwkv6.describe()
    assert "bonus: o_t += s*value,  s = scale * fq . (u * fk)" in text
    assert "inclusive=False" in text and "scale=1.0" in text
    text = mf.zoo.mamba2.describe()
    assert "B[B,T,G,K]" in text and "A_log[H]" in text and "decay: scalar" in text
    assert "decay: constant" in mf.zoo.retnet.describe()


# --------------------------------------------------------------------------- JSON / dict

@pytest.mark.parametrize("name", ZOO)
def test_json_round_trip(name):
    m = mf.zoo.ALL[name]
    m2 = Mixer.from_json(m.to_json())
    assert m2 == m and m2.content_hash == m.content_hash
    assert m2.describe() == m.describe() and m2.doc == m.doc
    assert Mixer.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    # the parsed operands keep their shape classes
    assert [(o.name, o.dim, o.grouped, type(o).__name__) for o in m2.operands] == \
           [(o.name, o.dim, o.grouped, type(o).__name__) for o in m.operands]


def test_to_dict_is_plain_json():
    d = mf.zoo.mamba2.to_dict()
    assert d["mixforge"] == 1 and d["name"] == "mamba2"
    assert {"name": "B", "dim": "key", "grouped": True} in d["inputs"]
    assert {"name": "A_log", "dim": None} in d["params"]
    assert set(d["maps"]) == {"fq", "fk", "fv", "fa"}
    assert json.loads(json.dumps(d)) == d


def test_round_trip_of_floats():
    for c in (1 / 3, 0.1, 2 ** -0.5, 1e-300, 123456.789):
        m = gla_like(fa=logsigmoid(a) * c, scale=c)
        m2 = Mixer.from_json(m.to_json())
        assert m2 == m and m2.content_hash == m.content_hash, c


def _gla_dict(**maps):
    d = mf.zoo.gla.to_dict()
    d["maps"].update(maps)
    return d


@pytest.mark.parametrize("text, match", [
    ("__import__('os').system('x')", "maps.fq uses the undefined symbol __import__"),
    ("q; import os", "maps.fq: operator ';' is not allowed"),
    ("q[0]", r"maps.fq: operator '\[' is not allowed"),
    ("q @ k", "maps.fq: operator '@' is not allowed"),
    ("q // 2", "maps.fq: operator '//' is not allowed"),
    ("q if q else k", "maps.fq uses the undefined symbol if"),
    ("lambda: q", "maps.fq uses the undefined symbol lambda"),
    ("q.__class__", "maps.fq uses the undefined symbol __class__"),
    ("exp.__globals__", "maps.fq uses the undefined symbol __globals__"),
    ("eval('q')", "maps.fq uses the undefined symbol eval"),
    ("'q'", "maps.fq: unexpected \"'q'\""),
    ("q +", "maps.fq: cannot parse"),
    ("(q", "maps.fq: cannot parse"),
    ("x * q", "maps.fq uses the undefined symbol x; declare it in inputs or params"),
    ("sigmoid(v)", "fq uses v, a per-value input"),
])
def test_from_dict_rejects_unknown_tokens_and_code(text, match):
    with pytest.raises(SpecError, match=match):
        Mixer.from_dict(_gla_dict(fq=text))


def test_from_dict_does_not_execute_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    for field in ("fq", "fa"):
        with pytest.raises(SpecError):
            Mixer.from_dict(_gla_dict(**{field: payload}))
    with pytest.raises(SpecError):
        Mixer.from_dict({**_gla_dict(), "bonus": {"weight": payload, "term": "s*value"}})
    assert not marker.exists()


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("mixforge"), "not a mixforge mixer description"),
    (lambda d: d.__setitem__("mixforge", 2), "not a mixforge mixer description"),
    (lambda d: d.pop("maps"), "mixer description lacks the field 'maps'"),
    (lambda d: d.pop("name"), "mixer description lacks the field 'name'"),
    (lambda d: d["maps"].pop("fq"), "mixer description lacks the field 'maps.fq'"),
    (lambda d: d["maps"].__setitem__("fz", "q"), r"unknown maps \['fz'\]"),
    (lambda d: d.__setitem__("maps", "q"), "maps must be an object"),
    (lambda d: d.__setitem__("inputs", ["q"]), "inputs must be a list of objects"),
    (lambda d: d.__setitem__("params", {"u": 1}), "params must be a list of objects"),
    (lambda d: d["inputs"][0].pop("name"), "mixer description lacks the field 'name'"),
    (lambda d: d["params"].append({"name": "q"}), "the name 'q' is declared twice"),
    (lambda d: d["inputs"][0].__setitem__("dim", "nope"), "dim must be 'key', 'value' or None"),
    (lambda d: d["inputs"][0].__setitem__("name", "import os"), "is not a Python identifier"),
    (lambda d: d["maps"].__setitem__("fq", 3), "maps.fq must be a string expression, got int"),
    (lambda d: d.__setitem__("norm", "batch"), "norm must be None, 'rms' or 'layer'"),
    (lambda d: d.__setitem__("scale", "0.5"), "scale must be a positive number"),
    (lambda d: d.__setitem__("normalize", "yes"), "normalize must be True or False"),
    (lambda d: d.__setitem__("bonus", {"weight": "a"}), "mixer description lacks the field 'term'"),
])
def test_from_dict_rejects_malformed(mutate, match):
    d = _gla_dict()
    mutate(d)
    with pytest.raises(SpecError, match=match):
        Mixer.from_dict(d)


@pytest.mark.parametrize("text", ["{", "[]", "null", '"gla"', "1"])
def test_from_json_rejects_non_mixers(text):
    with pytest.raises(SpecError, match="not valid JSON|not a mixforge mixer description"):
        Mixer.from_json(text)


# --------------------------------------------------------------------------- load_mixer

SPEC_FILE = textwrap.dedent("""
    from mixforge import Mixer, Input
    from mixforge.functions import logsigmoid, silu
    q, k, a = Input("q"), Input("k"), Input("a")
    v, g = Input("v", dim="value"), Input("g", dim="value")
    my_mixer = Mixer("my_mixer", fq=q, fk=k, fv=v, fa=logsigmoid(a) / 16, fg=silu(g), norm="rms")
    not_a_mixer = 42
""")


def test_load_from_zoo():
    assert load_mixer("gla") is mf.zoo.gla
    assert load_mixer(mf.zoo.rwkv6) is mf.zoo.rwkv6


def test_load_from_py_file(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(SPEC_FILE)
    m = load_mixer(f"{path}:my_mixer")
    assert m.name == "my_mixer" and m.content_hash == mf.zoo.gla.content_hash


def test_load_from_module():
    assert load_mixer("mixforge.spec.zoo:mamba2") is mf.zoo.mamba2


def test_load_from_json(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(mf.zoo.metala.to_json(indent=2))
    assert load_mixer(str(path)) == mf.zoo.metala


def test_load_errors(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(SPEC_FILE)
    with pytest.raises(SpecError, match="no such spec file: .*missing.py"):
        load_mixer(f"{tmp_path / 'missing.py'}:x")
    with pytest.raises(SpecError, match="no such spec file: .*missing.json"):
        load_mixer(str(tmp_path / "missing.json"))
    with pytest.raises(SpecError, match="m.py defines no 'nothing'"):
        load_mixer(f"{path}:nothing")
    with pytest.raises(SpecError, match="m.py:not_a_mixer is a int, not a mixforge.Mixer"):
        load_mixer(f"{path}:not_a_mixer")
    with pytest.raises(SpecError, match=r"unknown mixer 'glaa': not in the zoo \(linear_attention, .*\) and not 'file.py:NAME'"):
        load_mixer("glaa")
    with pytest.raises(SpecError, match="cannot import 'no_such_module_xyz'"):
        load_mixer("no_such_module_xyz:m")
    with pytest.raises(SpecError, match="a mixer reference must be a zoo name"):
        load_mixer("")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match="mixer description is not valid JSON"):
        load_mixer(str(bad))


# --------------------------------------------------------------------------- CLI

def test_cli_show_zoo(capsys):
    from mixforge.cli import main

    assert main(["show", "gla"]) == 0
    out = capsys.readouterr().out
    for line in ("fq = q", "fk = k", "fv = v", "fa = logsigmoid(a)/16", "fg = silu(g)"):
        assert line in out
    assert out.strip() == mf.zoo.gla.describe()


def test_cli_show_file(tmp_path, capsys):
    from mixforge.cli import main

    path = tmp_path / "m.py"
    path.write_text(SPEC_FILE)
    assert main(["show", f"{path}:my_mixer"]) == 0
    assert "mixer my_mixer" in capsys.readouterr().out


def test_cli_unknown_spec(capsys):
    from mixforge.cli import main

    assert main(["show", "no_such_mixer"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixforge: error: unknown mixer 'no_such_mixer': not in the zoo")


def test_cli_subprocess():
    ok = subprocess.run([sys.executable, "-m", "mixforge", "show", "rwkv6"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "fa = -exp(w)    [key]" in ok.stdout and "bonus: o_t += s*value" in ok.stdout


def test_cli_missing_file(capsys):
    from mixforge.cli import main

    assert main(["show", "missing.py:x"]) == 2
    assert "mixforge: error: no such spec file: missing.py" in capsys.readouterr().err
