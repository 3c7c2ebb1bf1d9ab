"""KernelPlan: the decisions the templates branch on, made from a Mixer (no kernel runs)."""
import pytest
import sympy

import mixforge as mf
from mixforge import Bonus, Input, Mixer, Param, s, t, value
from mixforge.codegen.plan import build_plan
from mixforge.functions import exp, logsigmoid, sigmoid


@pytest.mark.parametrize("name, decay", [("linear_attention", "none"), ("retnet", "constant"), ("rwkv4", "constant"),
                                         ("griffin", "scalar"), ("mamba2", "scalar"), ("gla", "key"),
                                         ("mamba", "key")])
def test_decay_kind(name, decay):
    assert build_plan(mf.zoo.ALL[name]).decay == decay


def test_inputs_feeding_each_map():
    p = build_plan(mf.zoo.mamba2)
    assert p.feeds["fq"] == ("C",)
    assert set(p.feeds["fk"]) == {"B", "dt", "dt_bias"}
    assert set(p.feeds["fa"]) == {"dt", "dt_bias", "A_log"}
    assert p.feeds["fv"] == ("x",)
    assert p.grouped == ("C", "B")
    assert [o.name for o in p.used_by(["fa"])] == ["dt", "dt_bias", "A_log"]
    assert p.operand_names == tuple(o.name for o in mf.zoo.mamba2.operands)
    assert p.operand("B").axes == ("B", "T", "G", "K") and p.operand("A_log").axes == ("H",)
    assert p.classes["fa"] == "scalar" and p.classes["fk"] == "key"


def test_option_flags():
    p = build_plan(mf.zoo.rwkv4)
    assert (p.inclusive, p.normalize, p.bonus, p.gate, p.norm) == (False, True, True, True, None)
    assert p.classes["fq"] == "constant" and p.classes["fk"] == "scalar" and p.classes["w"] == "key"
    assert p.feeds["w"] == ("u",) and p.term_params == ()
    assert p.has_epilogue
    q = build_plan(mf.zoo.hgrn2)
    assert not q.has_epilogue and not q.gate and q.norm is None
    assert q.feeds["fk"] == q.feeds["fa"] == ("a",)   # the tied key


def test_position_and_head_symbols():
    assert build_plan(mf.zoo.cosformer).uses_t and not build_plan(mf.zoo.cosformer).uses_h
    assert build_plan(mf.zoo.retnet).uses_h and not build_plan(mf.zoo.retnet).uses_t
    assert not build_plan(mf.zoo.gla).uses_t


def test_bonus_term_parameters():
    q, k, a = Input("q"), Input("k"), Input("a")
    v = Input("v", dim="value")
    beta = Param("beta", dim="value")
    m = Mixer("b", fq=q, fk=k, fv=v, fa=logsigmoid(a), bonus=Bonus(weight=exp(Param("u")), term=sigmoid(s) * beta * value))
    p = build_plan(m)
    assert p.term_params == ("beta",) and p.classes["term"] == "value"
    assert p.exprs["w"] == exp(Param("u"))
    assert "term" in p.describe() and "beta" in p.describe()


def test_plan_keeps_the_expressions():
    p = build_plan(mf.zoo.gla)
    assert p.exprs["fa"] == mf.zoo.gla.maps["fa"]
    assert set(p.exprs) == {"fq", "fk", "fv", "fa", "fg"}
    assert p.content_hash == mf.zoo.gla.content_hash and p.name == "gla"
    assert isinstance(p.exprs["fq"], sympy.Expr)
    assert build_plan(Mixer("tt", fq=Input("q") * t, fk=Input("k"), fv=Input("v", dim="value"))).uses_t


def test_passthrough_features_are_inputs_used_once_as_is():
    assert build_plan(mf.zoo.gla).passthrough == {"fq": "q", "fk": "k", "fv": "v"}
    assert build_plan(mf.zoo.rwkv6).passthrough == {"fq": "r", "fk": "k", "fv": "v"}
    assert build_plan(mf.zoo.hgrn2).passthrough == {"fq": "q", "fv": "v"}      # fk = 1 - a shares a with fa
    assert build_plan(mf.zoo.mamba2).passthrough == {"fv": "x"}                # C is grouped: heads summed
    assert build_plan(mf.zoo.linear_attention).passthrough == {"fv": "v"}      # elu(q) + 1
    q, k, v = Input("q"), Input("k"), Input("v", dim="value")
    # q also feeds the decay; a scaled input is not the input as-is; a tied q, k feeds two maps
    assert build_plan(Mixer("m", fq=q, fk=k, fv=v, fa=logsigmoid(q))).passthrough == {"fk": "k", "fv": "v"}
    assert build_plan(Mixer("m", fq=2 * q, fk=k, fv=v)).passthrough == {"fk": "k", "fv": "v"}
    assert build_plan(Mixer("m", fq=q, fk=q, fv=v)).passthrough == {"fv": "v"}
