"""The symbolic chain rule: groups of feature gradients per operand, checked against torch autograd."""
import sympy
import torch

import mixforge as mf
from mixforge.codegen.derivatives import GRAD, bonus_partials, chain_rule, operand_symbol
from mixforge.codegen.plan import build_plan
from mixforge.spec import functions as fn


def groups(plan):
    return {g.operand.name: [c.group for c in g.contributions] for g in chain_rule(plan)}


def test_groups_follow_the_feature_gradient_tiles():
    assert groups(build_plan(mf.zoo.mamba2)) == {
        "C": ["key"], "B": ["key"], "dt": ["key", "row"], "dt_bias": ["key", "row"], "x": ["value"],
        "A_log": ["row"]}
    assert groups(build_plan(mf.zoo.rwkv4)) == {"k": ["key"], "v": ["value"], "w": ["decay"], "r": ["value"],
                                                "u": ["weight"]}
    assert groups(build_plan(mf.zoo.cosformer))["freq"] == ["key"]


def test_a_tied_key_contributes_through_fk_and_fa():
    (a,) = [g for g in chain_rule(build_plan(mf.zoo.hgrn2)) if g.operand.name == "a"]
    (c,) = a.contributions
    assert c.group == "key" and {GRAD["fk"], GRAD["fa"]} <= c.expr.free_symbols


def test_partials_match_autograd():
    """sum_f G_f * df/dr, evaluated, equals the gradient of sum_f G_f * f by torch autograd."""
    plan = build_plan(mf.zoo.metala)
    gen = torch.Generator().manual_seed(0)
    values = {name: torch.randn(7, dtype=torch.float64, generator=gen) for name in plan.operand_names}
    grads = {g: torch.randn(7, dtype=torch.float64, generator=gen) for g in GRAD}
    syms = {name: operand_symbol(plan, name) for name in plan.operand_names}
    leaves = {n: v.clone().requires_grad_(True) for n, v in values.items()}
    total = 0
    for m in ("fq", "fk", "fv", "fa", "fg", "w"):
        f = sympy.lambdify([syms[n] for n in plan.operand_names], plan.exprs[m], modules=[fn.TORCH])
        total = total + (grads[m] * f(*(leaves[n] for n in plan.operand_names))).sum()
    auto = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    for og, want in zip(chain_rule(plan), auto):
        expr = sum(c.expr for c in og.contributions)
        args = [syms[n] for n in plan.operand_names] + list(GRAD.values())
        got = sympy.lambdify(args, expr, modules=[fn.TORCH])(*values.values(), *grads.values())
        torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64).expand(7), want)


def test_bonus_partials():
    ds, dv = bonus_partials(build_plan(mf.zoo.metala))
    s, v = sympy.symbols("s value", real=True)
    assert sympy.simplify(ds - v * fn.sigmoid(s * v) * (1 - fn.sigmoid(s * v))) == 0
    assert sympy.simplify(dv - s * fn.sigmoid(s * v) * (1 - fn.sigmoid(s * v))) == 0
