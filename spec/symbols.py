"""The atoms a declaration is written in: raw inputs, parameters, and index symbols.

Inputs and parameters are sympy Symbols that also carry their shape class, so
that the maps stay ordinary sympy expressions (derivatives, cse, printing all
work) while the Mixer can still tell a per-key input from a per-value one.
"""
from __future__ import annotations

import keyword

import sympy

from .errors import SpecError

#: shape classes of an operand's trailing dimension
KEY, VALUE, SCALAR = "key", "value", None
_DIMS = (KEY, VALUE, SCALAR)

#: names the generated kernels and the call API reserve for themselves
RESERVED = frozenset(
    {"h", "t", "s", "value", "scale", "initial_state", "output_final_state", "cu_seqlens", "state",
     "tl", "triton", "torch", "math"}
    # the expression language's own names: an operand called exp, pi or Float would shadow them when a
    # map is parsed from JSON or evaluated (keep in step with functions.ELEMENTWISE)
    | {"sigmoid", "logsigmoid", "softplus", "silu", "elu", "relu", "log1p", "exp", "log", "sqrt", "tanh",
       "cos", "sin", "Abs", "Piecewise", "pi", "E", "Integer", "Float", "Rational", "Symbol"}
)


class Operand(sympy.Symbol):
    """A named tensor the kernels receive. Subclasses fix whether it varies per token."""

    kind = "operand"
    is_real = True

    def __new__(cls, name: str, dim: str | None = KEY, grouped: bool = False):
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise SpecError(f"{cls.__name__} name {name!r} is not a Python identifier")
        if name.startswith("_") or name in RESERVED:
            raise SpecError(f"{cls.__name__} name {name!r} is reserved; choose another name")
        if dim not in _DIMS:
            raise SpecError(f"{cls.__name__} {name!r}: dim must be 'key', 'value' or None, got {dim!r}")
        # __xnew__ bypasses sympy's symbol cache: Input("q") and Input("q", dim="value")
        # must be distinct objects carrying their own dim.
        obj = sympy.Symbol.__xnew__(cls, name, real=True)
        obj.dim = dim
        obj.grouped = bool(grouped)
        return obj

    def __getnewargs_ex__(self):
        return (self.name, self.dim, self.grouped), {}

    def _hashable_content(self):
        return super()._hashable_content() + (self.kind, self.dim, self.grouped)

    def to_dict(self) -> dict:
        d = {"name": self.name, "dim": self.dim}
        if self.grouped:
            d["grouped"] = True
        return d

    def __repr__(self) -> str:
        extra = ", grouped=True" if self.grouped else ""
        return f"{type(self).__name__}({self.name!r}, dim={self.dim!r}{extra})"


class Input(Operand):
    """A raw per-token input: `[B,T,H,K]` (dim='key'), `[B,T,H,V]` ('value'), `[B,T,H]` (None).

    `grouped=True` (per key only) means `[B,T,G,K]` shared by H/G consecutive
    heads, as Mamba-2's B and C.
    """

    kind = "input"

    def __new__(cls, name: str, dim: str | None = KEY, grouped: bool = False):
        if grouped and dim != KEY:
            raise SpecError(f"Input {name!r}: only per-key inputs can be grouped, got dim={dim!r}")
        return super().__new__(cls, name, dim, grouped)


class Param(Operand):
    """A learned per-head tensor: `[H,K]` (dim='key'), `[H,V]` ('value'), `[H]` (None)."""

    kind = "param"

    def __new__(cls, name: str, dim: str | None = KEY):
        return super().__new__(cls, name, dim, False)


#: head index (0-based), constant per head: RetNet's decay is written with it
h = sympy.Symbol("h", integer=True, nonnegative=True)
#: position in the sequence (0-based, restarts at every sequence of a varlen batch)
t = sympy.Symbol("t", integer=True, nonnegative=True)
#: the bonus score s_t = scale * q_t . (weight * k_t), usable only in Bonus.term
s = sympy.Symbol("s", real=True)
#: the value fv_t (per value dim), usable only in Bonus.term
value = sympy.Symbol("value", real=True)

INDEX_SYMBOLS = {"h": h, "t": t}
BONUS_SYMBOLS = {"s": s, "value": value}
