"""The declaration: five sympy maps plus options, validated when constructed.

A Mixer is the contract between the user and every layer below: codegen reads
its maps, shape classes and decay kind; the tuner keys its caches by its
content hash; the reference evaluates it directly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import io
import json
import math
import sys
import tokenize
import warnings
from pathlib import Path
from typing import Any

import sympy

from . import functions as fn
from .errors import SpecError
from .symbols import BONUS_SYMBOLS, INDEX_SYMBOLS, KEY, SCALAR, VALUE, Input, Operand, Param, h, s, t, value

MAP_NAMES = ("fq", "fk", "fv", "fa", "fg")
NORMS = (None, "rms", "layer")

#: shape classes of a map, from the operands it uses
CLASS_KEY, CLASS_VALUE, CLASS_SCALAR, CLASS_CONSTANT = "key", "value", "scalar", "constant"
#: decay kinds, from fa's shape class
DECAY_NONE, DECAY_CONSTANT, DECAY_SCALAR, DECAY_KEY = "none", "constant", "scalar", "key"

_ALLOWED_MAP_CLASSES = {
    "fq": (CLASS_KEY, CLASS_SCALAR, CLASS_CONSTANT),
    "fk": (CLASS_KEY, CLASS_SCALAR, CLASS_CONSTANT),
    "fv": (CLASS_VALUE, CLASS_SCALAR, CLASS_CONSTANT),
    "fa": (CLASS_KEY, CLASS_SCALAR, CLASS_CONSTANT),
    "fg": (CLASS_VALUE, CLASS_SCALAR, CLASS_CONSTANT),
}
_EXPECTED = {
    "fq": "fq must be per key or scalar",
    "fk": "fk must be per key or scalar",
    "fv": "fv must be per value or scalar",
    "fa": "the decay must be per key or scalar",
    "fg": "fg must be per value or scalar",
}

_warned_undecided: set[str] = set()


class UndecidedDecayWarning(UserWarning):
    """sympy could not prove fa <= 0; the kernels assume it."""


# --------------------------------------------------------------------------- checks

def _as_expr(where: str, expr: Any) -> sympy.Expr:
    if isinstance(expr, bool) or expr is None:
        raise SpecError(f"{where} must be a sympy expression or a number, got {expr!r}")
    if isinstance(expr, (int, float)):
        return sympy.nsimplify(expr) if isinstance(expr, float) else sympy.Integer(expr)
    if isinstance(expr, sympy.Basic):
        if not isinstance(expr, sympy.Expr):
            raise SpecError(f"{where} is a {type(expr).__name__}, not an elementwise expression")
        return expr
    raise SpecError(
        f"{where} must be a sympy expression of Inputs and Params (use mixforge.functions), "
        f"got {type(expr).__name__} {expr!r}"
    )


def _check_elementwise(where: str, expr: sympy.Expr, extra_ok: tuple = ()) -> None:
    """Reject anything the kernels cannot evaluate token by token."""
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, (sympy.Symbol, sympy.Number, sympy.NumberSymbol)):
            if isinstance(node, sympy.Number) and not node.is_finite:
                raise SpecError(f"{where} contains the non-finite constant {node}")
            continue
        if isinstance(node, (sympy.Add, sympy.Mul, sympy.Pow)):
            continue
        if isinstance(node, sympy.Function) or isinstance(node, sympy.core.function.AppliedUndef):
            name = type(node).__name__
            # by identity: an undefined sympy.Function("sigmoid") only shares the name
            if fn.ELEMENTWISE.get(name) is type(node) or type(node) in extra_ok:
                continue
            if isinstance(node, sympy.core.function.AppliedUndef):
                raise SpecError(f"{where} uses the undefined function {name}; use mixforge.functions")
            raise SpecError(
                f"{where} uses the function {name}, which mixforge cannot print to Triton; "
                f"supported: {', '.join(sorted(fn.ELEMENTWISE))}"
            )
        if isinstance(node, sympy.core.relational.Relational) or isinstance(node, sympy.logic.boolalg.Boolean):
            raise SpecError(f"{where} uses the condition {node}; maps must be elementwise arithmetic")
        raise SpecError(f"{where} uses {type(node).__name__} ({node}), which is not elementwise")


def _operands(expr: sympy.Expr) -> list[Operand]:
    return sorted((x for x in expr.free_symbols if isinstance(x, Operand)), key=lambda x: x.name)


def shape_class(expr: sympy.Expr) -> str:
    """key, value, scalar (per token) or constant (per head at most)."""
    ops = _operands(expr)
    if any(o.dim == KEY for o in ops):
        return CLASS_KEY
    if any(o.dim == VALUE for o in ops):
        return CLASS_VALUE
    if any(isinstance(o, Input) for o in ops) or t in expr.free_symbols:
        return CLASS_SCALAR
    return CLASS_CONSTANT


def _check_symbols(where: str, expr: sympy.Expr, allow_bonus_symbols: bool = False) -> None:
    for x in sorted(expr.free_symbols, key=str):
        if isinstance(x, Operand):
            continue
        if x is h or x is t or x == h or x == t:
            continue
        if allow_bonus_symbols and (x == s or x == value):
            continue
        if x == s or x == value:
            raise SpecError(f"{where} uses {x}, which is defined only inside Bonus.term")
        if x.name in INDEX_SYMBOLS:
            raise SpecError(f"{where} uses a symbol named {x.name} that is not mixforge.{x.name}; import it from mixforge")
        raise SpecError(f"{where} uses the undefined symbol {x}; declare it with Input({x.name!r}) or Param({x.name!r})")


def _check_class(where: str, expr: sympy.Expr, allowed: tuple, expected: str) -> str:
    ops = _operands(expr)
    keys = [o for o in ops if o.dim == KEY]
    vals = [o for o in ops if o.dim == VALUE]
    if keys and vals:
        raise SpecError(
            f"{where} mixes per-key {keys[0].name} and per-value {vals[0].name}; "
            "a map is either per key or per value"
        )
    cls = shape_class(expr)
    if cls not in allowed:
        bad = (keys or vals)[0]
        kind = "input" if isinstance(bad, Input) else "parameter"
        raise SpecError(f"{where} uses {bad.name}, a per-{bad.dim} {kind}; {expected}")
    return cls


# --------------------------------------------------------------------------- Bonus

@dataclasses.dataclass(frozen=True, eq=False)
class Bonus:
    """A diagonal term: o_t += term(s_t, fv_t), with s_t = scale * fq_t . (weight * fk_t).

    `term` is written with the symbols `s` and `value` (the value, per value dim):
    `s * value` is RWKV-6's bonus, `sigmoid(s * value)` MetaLA's self-augmentation.
    """

    weight: Any
    term: Any = s * value

    def __post_init__(self):
        weight = _as_expr("Bonus.weight", self.weight)
        term = _as_expr("Bonus.term", self.term)
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "term", term)
        _check_symbols("Bonus.weight", weight)
        _check_elementwise("Bonus.weight", weight)
        if shape_class(weight) != CLASS_KEY or any(o.dim == VALUE for o in _operands(weight)):
            raise SpecError(
                f"Bonus.weight {weight} must be per key (for example Param('u') of shape [H, K]); "
                "a bonus needs a per-key weight"
            )
        if any(isinstance(o, Input) for o in _operands(weight)) or t in weight.free_symbols:
            raise SpecError(f"Bonus.weight {weight} must be a parameter (constant over tokens), not an input")
        _check_symbols("Bonus.term", term, allow_bonus_symbols=True)
        _check_elementwise("Bonus.term", term)
        for o in _operands(term):
            if isinstance(o, Input) or o.dim == KEY:
                raise SpecError(
                    f"Bonus.term uses {o.name}; the term may use s, value and per-head or per-value parameters only"
                )

    @property
    def linear_coefficient(self) -> sympy.Expr | None:
        """c(s) when term == c(s) * value (then the bonus is a weight on v_t), else None."""
        c = sympy.simplify(sympy.diff(self.term, value))
        if value in c.free_symbols or sympy.simplify(self.term - c * value) != 0:
            return None
        return c

    def __eq__(self, other):
        return isinstance(other, Bonus) and self.weight == other.weight and self.term == other.term

    def __hash__(self):
        return hash((self.weight, self.term))


# --------------------------------------------------------------------------- Mixer

class Mixer:
    """A linear-attention mixer in the unified (fq, fk, fv, fa, fg) form.

    S_t = diag(exp(fa_t)) S_{t-1} + fk_t fv_t^T;  o_t = scale * fq_t^T S_t (+ bonus);
    y_t = fg_t * Norm(o_t). See ALGORITHMS.md for the exact semantics.
    """

    def __init__(self, name: str, *, fq, fk, fv, fa=None, fg=None, normalize: bool = False,
                 inclusive: bool = True, scale: float | None = None, norm: str | None = None,
                 bonus: Bonus | None = None, doc: str | None = None):
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-." for c in name):
            raise SpecError(f"Mixer name must be a non-empty string of letters, digits, '_', '-', '.'; got {name!r}")
        self.name = name
        self.doc = doc
        maps = {"fq": fq, "fk": fk, "fv": fv, "fa": fa, "fg": fg}
        self.maps: dict[str, sympy.Expr] = {}
        self.classes: dict[str, str] = {}
        for key in MAP_NAMES:
            raw = maps[key]
            if raw is None and key in ("fa", "fg"):
                continue
            if raw is None:
                raise SpecError(f"{key} is required")
            expr = _as_expr(key, raw)
            _check_symbols(key, expr)
            _check_elementwise(key, expr)
            self.classes[key] = _check_class(key, expr, _ALLOWED_MAP_CLASSES[key], _EXPECTED[key])
            self.maps[key] = expr
        if "fa" in self.maps and self.maps["fa"] == 0:
            del self.maps["fa"], self.classes["fa"]
        if "fg" in self.maps and self.maps["fg"] == 1:
            del self.maps["fg"], self.classes["fg"]

        if not isinstance(normalize, bool):
            raise SpecError(f"normalize must be True or False, got {normalize!r}")
        if not isinstance(inclusive, bool):
            raise SpecError(f"inclusive must be True or False, got {inclusive!r}")
        if norm not in NORMS:
            raise SpecError(f"norm must be None, 'rms' or 'layer', got {norm!r}")
        if normalize and norm is not None:
            raise SpecError(
                f"normalize=True and norm={norm!r} together: the denominator already normalizes o; choose one"
            )
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
                raise SpecError(f"scale must be a positive number or None (K ** -0.5), got {scale!r}")
            scale = float(scale)
        if bonus is not None and not isinstance(bonus, Bonus):
            raise SpecError(f"bonus must be a mixforge.Bonus, got {type(bonus).__name__}")
        self.normalize, self.inclusive, self.scale, self.norm, self.bonus = normalize, inclusive, scale, norm, bonus

        self._check_unique_names()
        self._check_decay_sign()

    # ---- validation helpers
    def _all_exprs(self) -> list[tuple[str, sympy.Expr]]:
        items = list(self.maps.items())
        if self.bonus is not None:
            items += [("Bonus.weight", self.bonus.weight), ("Bonus.term", self.bonus.term)]
        return items

    def _check_unique_names(self) -> None:
        seen: dict[str, tuple[Operand, str]] = {}
        for where, expr in self._all_exprs():
            for o in _operands(expr):
                if o.name in seen and seen[o.name][0] != o:
                    first, first_where = seen[o.name]
                    raise SpecError(
                        f"the name {o.name} is declared twice: {first!r} in {first_where} and {o!r} in {where}"
                    )
                seen.setdefault(o.name, (o, where))

    def _check_decay_sign(self) -> None:
        fa = self.maps.get("fa")
        if fa is None:
            return
        if fa.is_positive:
            raise SpecError(f"fa = {fa} is positive; fa is the log of the decay and must be <= 0")
        if fa.is_nonpositive:
            return
        key = self.content_hash
        if key not in _warned_undecided:
            _warned_undecided.add(key)
            warnings.warn(
                f"mixer {self.name!r}: sympy cannot prove fa = {fa} <= 0; the kernels assume a log-decay "
                "<= 0 (write it with logsigmoid, -exp, -softplus or log1p(-x) so it can be proved)",
                UndecidedDecayWarning,
                stacklevel=3,  # the line that declares the Mixer
            )

    # ---- derived facts the layers below use
    @property
    def decay_kind(self) -> str:
        cls = self.classes.get("fa")
        return {None: DECAY_NONE, CLASS_CONSTANT: DECAY_CONSTANT, CLASS_SCALAR: DECAY_SCALAR,
                CLASS_KEY: DECAY_KEY}[cls]

    @property
    def operands(self) -> tuple[Operand, ...]:
        """Every Input and Param, in order of first use (fq, fk, fv, fa, fg, bonus)."""
        out: dict[str, Operand] = {}
        for _, expr in self._all_exprs():
            for o in sorted(expr.free_symbols, key=lambda x: sympy.default_sort_key(x)):
                if isinstance(o, Operand):
                    out.setdefault(o.name, o)
        return tuple(out.values())

    @property
    def inputs(self) -> tuple[Input, ...]:
        return tuple(o for o in self.operands if isinstance(o, Input))

    @property
    def params(self) -> tuple[Param, ...]:
        return tuple(o for o in self.operands if isinstance(o, Param))

    def uses(self, map_name: str) -> tuple[Operand, ...]:
        expr = self.maps.get(map_name)
        return tuple(_operands(expr)) if expr is not None else ()

    # ---- identity and serialization
    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "mixforge": 1,
            "name": self.name,
            "inputs": [o.to_dict() for o in self.inputs],
            "params": [o.to_dict() for o in self.params],
            "maps": {k: _sstr(v) for k, v in self.maps.items()},
            "normalize": self.normalize,
            "inclusive": self.inclusive,
            "scale": self.scale,
            "norm": self.norm,
            "bonus": None if self.bonus is None else {
                "weight": _sstr(self.bonus.weight), "term": _sstr(self.bonus.term)},
        }
        if self.doc:
            d["doc"] = self.doc
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "Mixer":
        if not isinstance(d, dict) or d.get("mixforge") != 1:
            raise SpecError("not a mixforge mixer description (missing 'mixforge': 1)")
        try:
            names: dict[str, Any] = {}
            for field, make in (("inputs", lambda o: Input(o["name"], dim=o.get("dim", KEY),
                                                           grouped=o.get("grouped", False))),
                                ("params", lambda o: Param(o["name"], dim=o.get("dim", KEY)))):
                entries = d.get(field, [])
                if not isinstance(entries, list) or not all(isinstance(o, dict) for o in entries):
                    raise SpecError(f"{field} must be a list of objects like {{'name': 'q', 'dim': 'key'}}")
                for o in entries:
                    if o.get("name") in names:
                        raise SpecError(f"the name {o['name']!r} is declared twice in inputs and params")
                    names[o["name"]] = make(o)
            if not isinstance(d["maps"], dict):
                raise SpecError("maps must be an object {'fq': '...', 'fk': '...', 'fv': '...', ...}")
            for k in ("fq", "fk", "fv"):
                if k not in d["maps"]:
                    raise KeyError(f"maps.{k}")
            maps = {k: _parse(f"maps.{k}", v, names) for k, v in d["maps"].items()}
            bonus = None
            if d.get("bonus"):
                bonus = Bonus(weight=_parse("bonus.weight", d["bonus"]["weight"], names),
                              term=_parse("bonus.term", d["bonus"]["term"], names))
            unknown = set(maps) - set(MAP_NAMES)
            if unknown:
                raise SpecError(f"unknown maps {sorted(unknown)}; expected {MAP_NAMES}")
            return cls(d["name"], **maps, normalize=d.get("normalize", False), inclusive=d.get("inclusive", True),
                       scale=d.get("scale"), norm=d.get("norm"), bonus=bonus, doc=d.get("doc"))
        except KeyError as e:
            raise SpecError(f"mixer description lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_json(cls, text: str) -> "Mixer":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SpecError(f"mixer description is not valid JSON: {e}") from None

    def _canonical(self) -> str:
        # srepr is exact (sstr may round floats); doc does not change the kernels
        d = self.to_dict()
        d.pop("doc", None)
        d["maps"] = {k: sympy.srepr(v) for k, v in self.maps.items()}
        if self.bonus is not None:
            d["bonus"] = {"weight": sympy.srepr(self.bonus.weight), "term": sympy.srepr(self.bonus.term)}
        return json.dumps(d, sort_keys=True)

    @property
    def content_hash(self) -> str:
        """Hash of the semantics (not the name or doc): keys generated code and tuned configs."""
        d = json.loads(self._canonical())
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def __eq__(self, other):
        return isinstance(other, Mixer) and self._canonical() == other._canonical()

    def __hash__(self):
        return hash(self._canonical())

    def __repr__(self):
        return f"Mixer({self.name!r}, hash={self.content_hash})"

    def describe(self) -> str:
        """The five maps in math form, then the options."""
        lines = [f"mixer {self.name}  (decay: {self.decay_kind}, hash {self.content_hash})"]
        for key in MAP_NAMES:
            if key in self.maps:
                lines.append(f"  {key} = {sympy.sstr(self.maps[key])}    [{self.classes[key]}]")
            else:
                lines.append(f"  {key} = {'0 (no decay)' if key == 'fa' else '1 (no gate)'}")
        opts = [f"inclusive={self.inclusive}", f"normalize={self.normalize}", f"norm={self.norm}",
                f"scale={'K**-0.5' if self.scale is None else self.scale}"]
        lines.append("  " + ", ".join(opts))
        if self.bonus is not None:
            lines.append(f"  bonus: o_t += {sympy.sstr(self.bonus.term)},  s = scale * fq . ({sympy.sstr(self.bonus.weight)} * fk)")
        ins = ", ".join(f"{o.name}{_shape_text(o)}" for o in self.operands)
        lines.append(f"  operands: {ins}")
        return "\n".join(lines)

    __str__ = describe


def _shape_text(o: Operand) -> str:
    if isinstance(o, Input):
        last = {KEY: "G,K" if o.grouped else "H,K", VALUE: "H,V", SCALAR: "H"}[o.dim]
        return f"[B,T,{last}]"
    return {KEY: "[H,K]", VALUE: "[H,V]", SCALAR: "[H]"}[o.dim]


# --------------------------------------------------------------------------- parsing

class _ExactPrinter(sympy.printing.str.StrPrinter):
    """sstr, except that double-precision Floats print all their digits (repr), so text round-trips."""

    def _print_Float(self, expr):
        if expr._prec == 53:
            return repr(float(expr))
        return super()._print_Float(expr)


def _sstr(expr) -> str:
    return _ExactPrinter().doprint(expr)


def _doubles(expr: sympy.Expr) -> sympy.Expr:
    """Parsed decimals get a precision from their digit count; make them the doubles that were printed."""
    floats = expr.atoms(sympy.Float)
    return expr.xreplace({f: sympy.Float(float(f)) for f in floats}) if floats else expr


_PARSE_CONSTANTS = {"pi": sympy.pi, "E": sympy.E}


def _parse(where: str, text: str, names: dict[str, Any]) -> sympy.Expr:
    """Parse an expression from a spec file without evaluating arbitrary Python."""
    if not isinstance(text, str):
        raise SpecError(f"{where} must be a string expression, got {type(text).__name__}")
    local = {**names, **INDEX_SYMBOLS, **BONUS_SYMBOLS, **fn.ELEMENTWISE, **_PARSE_CONSTANTS}
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, IndentationError) as e:
        raise SpecError(f"{where}: cannot parse {text!r}: {e}") from None
    for tok in toks:
        if tok.type == tokenize.NAME and tok.string not in local:
            raise SpecError(f"{where} uses the undefined symbol {tok.string}; declare it in inputs or params")
        if tok.type == tokenize.OP and tok.string not in "+-*/()**,.":
            raise SpecError(f"{where}: operator {tok.string!r} is not allowed in {text!r}")
        if tok.type not in (tokenize.NAME, tokenize.OP, tokenize.NUMBER, tokenize.NEWLINE,
                            tokenize.ENDMARKER, tokenize.NL):
            raise SpecError(f"{where}: unexpected {tok.string!r} in {text!r}")
    try:
        return _doubles(sympy.parse_expr(text, local_dict=local, evaluate=True))
    except Exception as e:  # sympy raises many types for malformed text
        raise SpecError(f"{where}: cannot parse {text!r}: {e}") from None


# --------------------------------------------------------------------------- loading

def load_mixer(ref: "str | Mixer") -> Mixer:
    """A Mixer from a zoo name, `path/file.py:NAME`, `package.module:NAME`, or a JSON file."""
    if isinstance(ref, Mixer):
        return ref
    if not isinstance(ref, str) or not ref:
        raise SpecError(f"a mixer reference must be a zoo name or 'file.py:NAME', got {ref!r}")
    from . import zoo

    if ":" not in ref:
        if ref.endswith(".json"):
            path = Path(ref)
            if not path.is_file():
                raise SpecError(f"no such spec file: {ref}")
            return Mixer.from_json(path.read_text())
        if ref in zoo.ALL:
            return zoo.ALL[ref]
        raise SpecError(f"unknown mixer {ref!r}: not in the zoo ({', '.join(zoo.ALL)}) and not 'file.py:NAME'")
    where, _, attr = ref.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise SpecError(f"no such spec file: {where}")
        mod_name = f"_mixforge_spec_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise SpecError(f"cannot import {where!r} for the mixer {ref!r}: {e}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise SpecError(f"{where} defines no {attr!r}")
    if not isinstance(obj, Mixer):
        raise SpecError(f"{ref} is a {type(obj).__name__}, not a mixforge.Mixer")
    return obj
