"""The sympy -> Triton printer: every supported function, evaluated with torch semantics and under Triton."""
import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import sympy
import torch

from mixforge.codegen.printer import HELPERS, PrintError, print_cse, print_expr, supported_functions
from mixforge.spec import functions as fn

x, y = sympy.symbols("x y", real=True)
NAMES = {x: "X", y: "Y"}


def _torch_tl():
    """A stand-in for triton.language over torch float64 tensors: the printed code's semantics."""
    f64 = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    return types.SimpleNamespace(
        exp=torch.exp, log=torch.log, sqrt=torch.sqrt, cos=torch.cos, sin=torch.sin, abs=torch.abs,
        exp2=torch.exp2, log2=torch.log2, floor=torch.floor,
        where=lambda c, a, b: torch.where(torch.as_tensor(c), f64(a), f64(b)),
        minimum=lambda a, b: torch.minimum(f64(a), f64(b)), maximum=lambda a, b: torch.maximum(f64(a), f64(b)),
    )


def _namespace():
    ns = {"os": types.SimpleNamespace(environ={"TRITON_INTERPRET": "1"}), "triton": None, "tl": _torch_tl()}
    exec(HELPERS, ns)
    return ns


NS = _namespace()


def run(expr, X, Y=None):
    """Evaluate the printed code of expr on torch tensors."""
    return eval(print_expr(expr, NAMES), dict(NS), {"X": X, "Y": Y})


def truth(expr, X, Y=None):
    f = sympy.lambdify([x, y], expr, modules=[fn.TORCH])
    return torch.as_tensor(f(X, Y if Y is not None else X), dtype=torch.float64)


GRID = torch.linspace(-30, 30, 241, dtype=torch.float64)
POS = torch.linspace(1e-3, 40, 200, dtype=torch.float64)
CASES = [
    (fn.sigmoid(x), GRID), (fn.logsigmoid(x), GRID), (fn.softplus(x), GRID), (fn.silu(x), GRID),
    (fn.elu(x), GRID), (fn.relu(x), GRID), (fn.log1p(x), POS - 0.999), (sympy.exp(x), GRID),
    (sympy.log(x), POS), (sympy.sqrt(x), POS), (sympy.tanh(x), GRID), (sympy.cos(x), GRID), (sympy.sin(x), GRID),
    (sympy.Abs(x), GRID),
]


NAMES_OF_CASES = ["sigmoid", "logsigmoid", "softplus", "silu", "elu", "relu", "log1p", "exp", "log", "sqrt",
                  "tanh", "cos", "sin", "Abs"]


def test_cases_cover_every_declarable_function():
    assert set(NAMES_OF_CASES) == set(fn.ELEMENTWISE)
    for (e, _), name in zip(CASES, NAMES_OF_CASES):
        assert e == fn.ELEMENTWISE[name](x)
    assert set(fn.ELEMENTWISE) <= supported_functions()


@pytest.mark.parametrize("expr, X", CASES, ids=NAMES_OF_CASES)
def test_functions_match_torch(expr, X):
    torch.testing.assert_close(run(expr, X), truth(expr, X), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("f", [fn.sigmoid, fn.logsigmoid, fn.softplus, fn.silu, fn.tanh, fn.elu])
def test_stable_at_extremes(f):
    X = torch.tensor([-1e4, -800.0, -100.0, 100.0, 800.0, 1e4], dtype=torch.float64)
    got = run(f(x), X)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, truth(f(x), X), rtol=1e-12, atol=0)


def test_log1p_keeps_relative_accuracy_near_zero():
    X = torch.tensor([1e-12, -3e-9, 2e-7], dtype=torch.float64)
    torch.testing.assert_close(run(fn.log1p(x), X), torch.log1p(X), rtol=1e-12, atol=0)


@pytest.mark.parametrize("expr, domain", [
    (x ** 2, GRID), (x ** 3 / (1 + y ** 2), GRID), (1 / x, POS), (x ** -3, POS), (sympy.sqrt(x) ** 3, POS),
    (x ** sympy.Rational(-3, 2), POS), (x ** sympy.Rational(1, 3), POS), (2 ** (-5 - y), GRID), (3 ** y, GRID),
    (sympy.E ** y, GRID), (x ** 12, GRID / 10), (x ** 11, GRID / 10), ((x ** 2 + 1) ** y, GRID), (-x / 16, GRID),
    (x - 2 * (y - x) ** 2, GRID), (sympy.pi * x, GRID),
])
def test_arithmetic_and_powers(expr, domain):
    Y = torch.linspace(-2, 3, domain.numel(), dtype=torch.float64)
    torch.testing.assert_close(run(expr, domain, Y), truth(expr, domain, Y), rtol=1e-10, atol=1e-12)


def test_power_of_a_base_of_unknown_sign():
    X = torch.tensor([-2.0, -2.0, -3.0, 0.5, -1.5], dtype=torch.float64)
    Y = torch.tensor([3.0, 2.0, -1.0, 0.5, 0.5], dtype=torch.float64)
    got = run(x ** y, X, Y)
    want = torch.pow(X, Y)
    assert torch.isnan(got[-1]) and torch.isnan(want[-1])   # negative base, fractional exponent
    torch.testing.assert_close(got[:-1], want[:-1])


def autograd_derivative(f, X):
    """d f / dx by torch autograd, f given by its sympy class (the reference's torch implementation)."""
    X = X.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn.TORCH[f.__name__](X).sum(), X)
    return g


def test_derivatives_print_piecewise_and_sign():
    X = torch.tensor([-2.0, -0.5, 0.5, 2.0], dtype=torch.float64)
    for f in (fn.relu, fn.elu, sympy.Abs, fn.softplus, fn.logsigmoid, fn.silu, fn.tanh, fn.log1p):
        torch.testing.assert_close(run(sympy.diff(f(x), x), X.abs() if f is fn.log1p else X),
                                   autograd_derivative(f, X.abs() if f is fn.log1p else X))
    assert "tl.where(X > 0.0" in print_expr(sympy.diff(fn.relu(x), x), NAMES)
    assert "_sign(X)" == print_expr(sympy.diff(sympy.Abs(x), x), NAMES)


def test_readable_forms():
    assert print_expr(fn.logsigmoid(x) / 16, NAMES) == "_logsigmoid(X) / 16.0"
    assert print_expr(x ** 2, NAMES) == "X * X"
    assert print_expr(2 ** (-5 - y), NAMES) == "tl.exp2(-Y - 5.0)"
    assert print_expr(1 - sympy.exp(x), NAMES) == "1.0 - tl.exp(X)"


def test_cse_emits_a_shared_subexpression_once():
    sp = fn.softplus(x + y)
    temps, codes = print_cse([sp * x, -sp * sympy.exp(y)], NAMES, "_t")
    assert temps == ["_t0 = _softplus(X + Y)"]
    assert codes == ["_t0 * X", "-_t0 * tl.exp(Y)"]


def test_unprintable_nodes_are_errors():
    with pytest.raises(PrintError, match="erf"):
        print_expr(sympy.erf(x), NAMES)
    with pytest.raises(PrintError, match="no value for the symbol z"):
        print_expr(sympy.Symbol("z") + x, NAMES)
    with pytest.raises(PrintError, match="non-finite"):
        print_expr(x + sympy.oo, NAMES)


def test_printed_code_runs_under_triton(tmp_path):
    """The same expressions as a real Triton kernel (interpreter): tl semantics, python-float broadcasting."""
    exprs = [e for e, _ in CASES] + [x ** 3, x ** sympy.Rational(-1, 2), 2 ** y, x ** y, x ** 11,
                                     sympy.Abs(x) * fn.sigmoid(y), x ** sympy.Rational(1, 3)]
    body = "\n".join(f"    tl.store(out + {i} * N + o, ({print_expr(e, NAMES)}) + tl.zeros([N], tl.float32))"
                     for i, e in enumerate(exprs))
    src = ("import os\nimport triton\nimport triton.language as tl\n\n" + HELPERS +
           "\n\n@triton.jit\ndef k(xp, yp, out, N: tl.constexpr):\n    o = tl.arange(0, N)\n"
           "    X = tl.load(xp + o)\n    Y = tl.load(yp + o)\n" + body + "\n")
    path = tmp_path / "printed_kernels.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("printed_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["printed_kernels"] = mod
    spec.loader.exec_module(mod)
    X = torch.linspace(0.05, 6.0, 32)
    Y = torch.linspace(-3.0, 3.0, 32)
    out = torch.empty(len(exprs), 32)
    with np.errstate(all="ignore"):   # untaken tl.where branches may overflow
        mod.k[(1,)](X, Y, out, N=32)
    for i, e in enumerate(exprs):
        want = truth(e, X.double(), Y.double()).expand(32).float()
        torch.testing.assert_close(out[i], want, rtol=2e-6, atol=2e-6, msg=lambda m: f"{e}: {m}")
