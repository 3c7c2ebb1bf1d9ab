"""Elementwise functions a declaration may use.

The activations common in sequence models are sympy Functions of their own
rather than compositions of exp and log: that keeps their sign known to sympy
(logsigmoid <= 0 lets the Mixer prove a decay is valid), gives exact
derivatives for the backward kernels, and lets the printer emit a stable form
(a naive log(1 + exp(-x)) overflows for x << 0).

`ELEMENTWISE` lists every function a map may use, by sympy class name; the
codegen printer must cover exactly this set, and `TORCH` evaluates it for the
float64 reference.
"""
from __future__ import annotations

import math

import sympy
import torch
import torch.nn.functional as F
from sympy import Abs, Piecewise, cos, exp, log, sin, sqrt, tanh

__all__ = [
    "sigmoid", "logsigmoid", "softplus", "silu", "elu", "relu", "log1p",
    "exp", "log", "sqrt", "tanh", "cos", "sin", "Abs",
]


def _real(arg):
    return arg.is_extended_real


class sigmoid(sympy.Function):
    """1 / (1 + exp(-x))."""

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0]) * (1 - sigmoid(self.args[0]))

    def _eval_is_extended_real(self):
        return _real(self.args[0])

    def _eval_is_positive(self):
        return _real(self.args[0])

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + exp(-x))


class logsigmoid(sympy.Function):
    """log(sigmoid(x)) = -softplus(-x), always <= 0: the usual gated decay."""

    def fdiff(self, argindex=1):
        return sigmoid(-self.args[0])

    def _eval_is_extended_real(self):
        return _real(self.args[0])

    def _eval_is_nonpositive(self):
        return _real(self.args[0])

    def _eval_is_negative(self):
        return _real(self.args[0]) and self.args[0].is_finite

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return -log(1 + exp(-x))


class softplus(sympy.Function):
    """log(1 + exp(x)), always > 0: Mamba's step size."""

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_is_extended_real(self):
        return _real(self.args[0])

    def _eval_is_positive(self):
        return _real(self.args[0]) and self.args[0].is_finite

    def _eval_is_nonnegative(self):
        return _real(self.args[0])

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return log(1 + exp(x))


class silu(sympy.Function):
    """x * sigmoid(x) (swish)."""

    def fdiff(self, argindex=1):
        x = self.args[0]
        return sigmoid(x) * (1 + x * (1 - sigmoid(x)))

    def _eval_is_extended_real(self):
        return _real(self.args[0])

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return x / (1 + exp(-x))


class elu(sympy.Function):
    """x for x > 0, exp(x) - 1 otherwise (alpha = 1); elu + 1 is the classic positive feature map."""

    def fdiff(self, argindex=1):
        x = self.args[0]
        return Piecewise((1, x > 0), (exp(x), True))

    def _eval_is_extended_real(self):
        return _real(self.args[0])

    def _eval_is_positive(self):
        return self.args[0].is_positive

    def _eval_rewrite_as_Piecewise(self, x, **kwargs):
        return Piecewise((x, x > 0), (exp(x) - 1, True))


class relu(sympy.Function):
    """max(x, 0)."""

    def fdiff(self, argindex=1):
        return Piecewise((1, self.args[0] > 0), (0, True))

    def _eval_is_extended_real(self):
        return _real(self.args[0])

    def _eval_is_nonnegative(self):
        return _real(self.args[0])

    def _eval_rewrite_as_Piecewise(self, x, **kwargs):
        return Piecewise((x, x > 0), (0, True))


class log1p(sympy.Function):
    """log(1 + x), accurate for small x; <= 0 exactly when x <= 0 (RetNet's decay)."""

    def fdiff(self, argindex=1):
        return 1 / (1 + self.args[0])

    def _eval_is_extended_real(self):
        x = self.args[0]
        return True if (x + 1).is_positive else None

    def _eval_is_nonpositive(self):
        return self.args[0].is_nonpositive

    def _eval_is_nonnegative(self):
        return self.args[0].is_nonnegative

    def _eval_rewrite_as_log(self, x, **kwargs):
        return log(1 + x)


#: sympy class name -> sympy class, for every function a map may contain
ELEMENTWISE: dict[str, type] = {
    cls.__name__: cls
    for cls in (sigmoid, logsigmoid, softplus, silu, elu, relu, log1p, exp, log, sqrt, tanh, cos, sin, Abs)
}

#: derivatives introduce these; they are printable but not offered for declarations
DERIVATIVE_ONLY: dict[str, type] = {"Piecewise": Piecewise}


def _tensor_op(fn):
    def op(x):
        return fn(x if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64))
    op.__name__ = getattr(fn, "__name__", "op")
    return op


#: namespace for sympy.lambdify: evaluates a map on torch tensors (reference, layer)
TORCH: dict[str, object] = {
    "sigmoid": _tensor_op(torch.sigmoid),
    "logsigmoid": _tensor_op(F.logsigmoid),
    "softplus": _tensor_op(F.softplus),
    "silu": _tensor_op(F.silu),
    "elu": _tensor_op(F.elu),
    "relu": _tensor_op(torch.relu),
    "log1p": _tensor_op(torch.log1p),
    "exp": _tensor_op(torch.exp),
    "log": _tensor_op(torch.log),
    "sqrt": _tensor_op(torch.sqrt),
    "tanh": _tensor_op(torch.tanh),
    "cos": _tensor_op(torch.cos),
    "sin": _tensor_op(torch.sin),
    "Abs": _tensor_op(torch.abs),
    "pi": math.pi,
    "E": math.e,
}
