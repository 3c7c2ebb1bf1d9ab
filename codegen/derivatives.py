"""Partial derivatives of the maps, by sympy: the symbolic half of the chain rule.

The core of a path returns gradients of the maps (feature space). For every
raw operand r the chain-rule kernel computes

    dr = sum over maps f of  df * (partial f / partial r)

and reduces the product over what r does not vary along. The reduction
depends on the tile the feature gradient lives on, so the terms are grouped
by it (`GROUPS`); within a group the products share one tile shape and are
summed symbolically, so cse sees them together.
"""
from __future__ import annotations

import dataclasses

import sympy

from ..spec.symbols import s as S_SYMBOL
from ..spec.symbols import value as VALUE_SYMBOL
from .plan import KernelPlan, OperandInfo

#: the tile on which a feature gradient lives, by group:
#:   key    [rows, K]   dfq, dfk, and dfa for a per-key decay
#:   value  [rows, V]   dfv, dfg
#:   row    [rows, 1]   dfa for a scalar decay
#:   decay  per head    dfa for a constant decay (already summed over tokens)
#:   weight [1, K]      dw, the bonus weight's gradient (already summed over tokens)
#:   term   [rows, V]   do, for parameters inside the bonus term
GROUPS = ("key", "value", "row", "decay", "weight", "term")

#: stand-ins for the feature gradients in the printed partials; the chain kernel loads them as g_<name>
GRAD = {name: sympy.Symbol(f"grad_{name}", real=True) for name in ("fq", "fk", "fv", "fa", "fg", "w", "do")}


class DerivativeError(ValueError):
    """sympy left a derivative unevaluated: a function without a known derivative."""


def partial(expr: sympy.Expr, wrt: sympy.Symbol) -> sympy.Expr:
    d = sympy.diff(expr, wrt)
    if d.has(sympy.Derivative) or d.has(sympy.Subs):
        raise DerivativeError(f"d({expr})/d({wrt}) = {d} is not elementwise; cannot generate its backward")
    return d


def group_of(plan: KernelPlan, name: str) -> str:
    """The group of the feature gradient of expression `name` (fq, fk, fv, fa, fg, w, term)."""
    if name in ("fq", "fk"):
        return "key"
    if name in ("fv", "fg"):
        return "value"
    if name == "fa":
        return {"key": "key", "scalar": "row", "constant": "decay"}[plan.decay]
    if name == "w":
        return "weight"
    if name == "term":
        return "term"
    raise KeyError(name)


@dataclasses.dataclass(frozen=True)
class Contribution:
    group: str           # one of GROUPS
    expr: sympy.Expr     # sum over the group's maps f of GRAD[f] * df/dr (term: GRAD["do"] * dterm/dr)


@dataclasses.dataclass(frozen=True)
class OperandGrad:
    operand: OperandInfo
    contributions: tuple[Contribution, ...]   # in GROUPS order; empty if no map depends on the operand


def operand_symbol(plan: KernelPlan, name: str) -> sympy.Symbol:
    """The sympy Symbol of an operand, as the plan's expressions contain it."""
    for e in plan.exprs.values():
        for x in e.free_symbols:
            if getattr(x, "name", None) == name and hasattr(x, "dim"):
                return x
    raise KeyError(name)


def chain_rule(plan: KernelPlan) -> tuple[OperandGrad, ...]:
    """Every operand's gradient as grouped sums of (feature gradient x partial)."""
    out = []
    for o in plan.operands:
        r = operand_symbol(plan, o.name)
        sums: dict[str, sympy.Expr] = {}
        for name, e in plan.exprs.items():
            if o.name not in plan.feeds[name]:
                continue
            g = GRAD["do"] if name == "term" else GRAD[name]
            term = g * partial(e, r)
            if term != 0:
                group = group_of(plan, name)
                sums[group] = sums.get(group, sympy.Integer(0)) + term
        out.append(OperandGrad(o, tuple(Contribution(grp, sums[grp]) for grp in GROUPS if grp in sums)))
    return tuple(out)


def bonus_partials(plan: KernelPlan) -> tuple[sympy.Expr, sympy.Expr]:
    """(d term / d s, d term / d value): how the bonus passes do on to s (hence fq, fk, w) and to fv."""
    term = plan.exprs["term"]
    return partial(term, S_SYMBOL), partial(term, VALUE_SYMBOL)
