"""sympy -> Triton code on tiles.

The printer covers exactly `spec.functions.ELEMENTWISE`, plus what
derivatives introduce (`Piecewise` from relu/elu, `sign` from Abs). Every
expression is elementwise, so the printed code works on tiles of any shape
(and on 0-d scalars): broadcasting is the job of how operands are loaded.

Activations print as calls to small `@triton.jit` helpers (`HELPERS`, emitted
once at the top of every generated module) written in their stable forms:
nothing overflows for large |x|, and log1p keeps its accuracy near 0. The
helpers use only `tl` functions that exist in Triton 3.4 and newer, under the
interpreter and on CUDA.

`print_cse` runs `sympy.cse` over several expressions at once, so a
subexpression shared by maps (Mamba's softplus(dt + b) feeds fk and fa) or by
partial derivatives is computed once.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import sympy
from sympy.core.relational import Relational
from sympy.logic.boolalg import And, BooleanFalse, BooleanTrue, Not, Or

from ..spec import functions as fn

#: sympy function name -> Triton callable (tl.* builtins, or a helper from HELPERS)
FUNCTIONS: dict[str, str] = {
    "exp": "tl.exp",
    "log": "tl.log",
    "sqrt": "tl.sqrt",
    "cos": "tl.cos",
    "sin": "tl.sin",
    "Abs": "tl.abs",
    "tanh": "_tanh",
    "sigmoid": "_sigmoid",
    "logsigmoid": "_logsigmoid",
    "softplus": "_softplus",
    "silu": "_silu",
    "elu": "_elu",
    "relu": "_relu",
    "log1p": "_log1p",
    "sign": "_sign",     # d|x|/dx
}

#: the helpers, as Triton source; the generated module starts with them. Under Triton's
#: interpreter every call into a jit function re-patches triton.language (milliseconds per
#: call), so there the helpers run as plain Python, and `_sum` (tl.sum is a jit function)
#: calls the reduction the interpreter runs with numpy. Compiled, they are tl.sum and jit functions.
HELPERS = '''
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
helper = (lambda fn: fn) if INTERPRET else triton.jit

if INTERPRET:
    def _sum(x, axis):
        return tl.reduce(x, axis, tl.standard._sum_combine)
else:
    _sum = tl.sum


@helper
def _log1p(x):
    # log(1 + x) keeping its relative accuracy for tiny x (Goldberg): the rounding
    # error of u = 1 + x cancels in log(u) * x / (u - 1)
    u = 1.0 + x
    d = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, x, tl.log(u) * (x / d))


@helper
def _sigmoid(x):
    # exp of -|x| only: never overflows
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@helper
def _logsigmoid(x):
    # min(x, 0) - log(1 + exp(-|x|)): exact to the last bit for x >> 0 and x << 0
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@helper
def _softplus(x):
    # torch's threshold: above 20, log(1 + exp(x)) == x in fp32
    return tl.where(x > 20.0, x, _log1p(tl.exp(tl.minimum(x, 20.0))))


@helper
def _silu(x):
    return x * _sigmoid(x)


@helper
def _elu(x):
    return tl.where(x > 0, x, tl.exp(tl.minimum(x, 0.0)) - 1.0)


@helper
def _relu(x):
    return tl.maximum(x, 0.0)


@helper
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, r, -r)


@helper
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@helper
def _pow(x, y):
    # x ** y, y a tensor, for a base of unknown sign: |x| ** y, negated for a negative base
    # and an odd integer exponent, NaN for a negative base and a fractional exponent (as torch.pow)
    m = tl.exp2(y * tl.log2(tl.abs(x)))
    odd = tl.abs(y - 2.0 * tl.floor(y * 0.5)) == 1.0
    whole = y == tl.floor(y)
    neg = tl.where(whole, tl.where(odd, -m, m), float("nan"))
    return tl.where(x < 0, neg, m)
'''

#: integer exponents up to this are printed as products; larger ones use _pow
MAX_PRODUCT_POWER = 8


class PrintError(ValueError):
    """An expression has a node the printer cannot turn into Triton code."""


def _number(x: sympy.Expr) -> str:
    """A float literal: integers print as 3.0 so no integer arithmetic sneaks into tiles."""
    v = float(x)
    if v != v or v in (float("inf"), float("-inf")):
        raise PrintError(f"non-finite constant {x}")
    return repr(v)


class TritonPrinter:
    """Prints one expression; `names` maps every free symbol to the code holding its value."""

    def __init__(self, names: Mapping[sympy.Symbol, str]):
        self.names = dict(names)

    def doprint(self, expr: sympy.Expr) -> str:
        return self._print(sympy.sympify(expr))

    def _wrap(self, expr: sympy.Expr, context: str) -> str:
        """Print `expr` as an operand: context "factor" (of * or /) or "divisor" (right of /)."""
        code = self._print(expr)
        atom = (isinstance(expr, (sympy.Symbol, sympy.Function, sympy.NumberSymbol))
                or (expr.is_Number and expr >= 0))
        if atom:
            return code
        if context == "divisor" or isinstance(expr, sympy.Add) or self._negative(expr) or " / " in code:
            return f"({code})"
        return code

    @staticmethod
    def _negative(expr: sympy.Expr) -> bool:
        if expr.is_Number:
            return bool(expr < 0)
        return isinstance(expr, sympy.Mul) and expr.args[0].is_Number and bool(expr.args[0] < 0)

    def _print(self, expr) -> str:
        if isinstance(expr, sympy.Symbol):
            if expr not in self.names:
                raise PrintError(f"no value for the symbol {expr} in this kernel")
            return self.names[expr]
        if expr.is_Number or isinstance(expr, sympy.NumberSymbol):
            return _number(expr)
        if isinstance(expr, sympy.Add):
            return self._print_add(expr)
        if isinstance(expr, sympy.Mul):
            return self._print_mul(expr)
        if isinstance(expr, sympy.Pow):
            return self._print_pow(expr)
        if isinstance(expr, sympy.Piecewise):
            return self._print_piecewise(expr)
        if isinstance(expr, (Relational, And, Or, Not)):   # a condition hoisted by cse
            return self._print_cond(expr)
        if isinstance(expr, sympy.Function):
            name = type(expr).__name__
            if name not in FUNCTIONS:
                raise PrintError(f"cannot print the function {name}; supported: {', '.join(sorted(FUNCTIONS))}")
            return f"{FUNCTIONS[name]}({', '.join(self._print(a) for a in expr.args)})"
        raise PrintError(f"cannot print {type(expr).__name__} ({expr}) as Triton code")

    def _print_add(self, expr: sympy.Add) -> str:
        terms = expr.as_ordered_terms()
        out = self._print(terms[0])
        for term in terms[1:]:
            if self._negative(term):
                out += f" - {self._wrap(-term, 'factor')}"
            else:
                out += f" + {self._print(term)}"
        return out

    def _print_mul(self, expr: sympy.Mul) -> str:
        coeff, rest = expr.as_coeff_Mul()
        if coeff < 0:
            return f"-{self._print_mul_positive(-coeff, rest)}"
        return self._print_mul_positive(coeff, rest)

    def _print_mul_positive(self, coeff: sympy.Number, rest: sympy.Expr) -> str:
        num, den = [], []
        for f in sympy.Mul.make_args(rest):
            if isinstance(f, sympy.Pow) and f.exp.is_Integer and f.exp < 0:
                den.append(f.base if f.exp == -1 else sympy.Pow(f.base, -f.exp, evaluate=False))
            elif f != 1:
                num.append(f)
        if coeff.is_Rational and not coeff.is_Integer and coeff.p == 1:
            den.insert(0, sympy.Integer(coeff.q))   # x / 16.0 reads better than 0.0625 * x
        elif coeff != 1 or not num:
            num.insert(0, coeff)
        text = " * ".join(self._wrap(f, 'factor') for f in num)
        if den:
            d = " * ".join(self._wrap(f, 'factor') for f in den)
            text += f" / ({d})" if len(den) > 1 else f" / {self._wrap(den[0], 'divisor')}"
        return text

    def _print_pow(self, expr: sympy.Pow) -> str:
        base, e = expr.base, expr.exp
        if e.is_Integer and 0 < abs(int(e)) <= MAX_PRODUCT_POWER:
            n = abs(int(e))
            if e > 0:
                return " * ".join([self._wrap(base, 'factor')] * n)
            if n == 1:
                return f"1.0 / {self._wrap(base, 'divisor')}"
            return f"1.0 / ({' * '.join([self._wrap(base, 'factor')] * n)})"
        if e.is_Rational and e.q == 2:
            # half-integer powers: sqrt times an integer power, no exp/log
            whole = (abs(e.p) - 1) // 2
            mag = " * ".join([f"tl.sqrt({self._print(base)})"] + [self._wrap(base, 'factor')] * whole)
            if e > 0:
                return mag
            return f"1.0 / ({mag})" if whole else f"1.0 / {mag}"
        if base == sympy.E:
            return f"tl.exp({self._print(e)})"
        if base.is_Number and base > 0:
            if base == 2:
                return f"tl.exp2({self._print(e)})"
            return f"tl.exp2({self._wrap(e, 'factor')} * {_number(sympy.log(base, 2))})"
        if base.is_positive or (e.is_Number and not e.is_Integer):
            # a fractional power of a negative number is NaN, as in torch.pow; log2 gives just that
            return f"tl.exp2({self._wrap(e, 'factor')} * tl.log2({self._print(base)}))"
        if e.is_Integer:
            # a large integer power: |x| ** n, with the sign of x for odd n
            mag = f"tl.exp2({_number(e)} * tl.log2(tl.abs({self._print(base)})))"
            return mag if int(e) % 2 == 0 else f"_sign({self._print(base)}) * {mag}"
        return f"_pow({self._print(base)}, {self._print(e)})"

    def _print_piecewise(self, expr: sympy.Piecewise) -> str:
        *branches, (last, last_cond) = expr.args
        if last_cond is not sympy.true:
            raise PrintError(f"Piecewise without a default branch: {expr}")
        out = self._print(last)
        for value, cond in reversed(branches):
            out = f"tl.where({self._print_cond(cond)}, {self._print(value)}, {out})"
        return out

    def _print_cond(self, cond) -> str:
        if isinstance(cond, Relational):
            return f"{self._wrap(cond.lhs, 'divisor')} {cond.rel_op} {self._wrap(cond.rhs, 'divisor')}"
        if isinstance(cond, And):
            return " & ".join(f"({self._print_cond(c)})" for c in cond.args)
        if isinstance(cond, Or):
            return " | ".join(f"({self._print_cond(c)})" for c in cond.args)
        if isinstance(cond, Not):
            return f"~({self._print_cond(cond.args[0])})"
        if isinstance(cond, (BooleanTrue, BooleanFalse)):
            raise PrintError(f"constant condition {cond} in a Piecewise")
        if isinstance(cond, sympy.Symbol):
            return self._print(cond)
        raise PrintError(f"cannot print the condition {cond}")


def print_expr(expr: sympy.Expr, names: Mapping[sympy.Symbol, str]) -> str:
    return TritonPrinter(names).doprint(expr)


def print_cse(exprs: Iterable[sympy.Expr], names: Mapping[sympy.Symbol, str], prefix: str) -> tuple[list[str], list[str]]:
    """Common subexpressions of `exprs` hoisted into temporaries `<prefix>0, <prefix>1, ...`.

    Returns (lines assigning the temporaries, the code of each expression in
    terms of them). Temporaries get the prefix so that two blocks in one
    kernel never share a name (Triton treats a name set before a loop and
    again inside it as loop-carried).
    """
    exprs = [sympy.sympify(e) for e in exprs]
    if not exprs:
        return [], []
    temps = sympy.numbered_symbols(prefix, real=True)
    replacements, reduced = sympy.cse(exprs, symbols=temps, order="none")
    printer = TritonPrinter(names)
    lines = []
    for sym, sub in replacements:
        lines.append(f"{sym.name} = {printer.doprint(sub)}")
        printer.names[sym] = sym.name
    return lines, [printer.doprint(e) for e in reduced]


def supported_functions() -> set[str]:
    """Function names the printer handles: ELEMENTWISE plus what derivatives add."""
    return set(fn.ELEMENTWISE) | {"sign"} | set(fn.DERIVATIVE_ONLY)
