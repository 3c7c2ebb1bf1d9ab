"""Mixer -> KernelPlan: every decision the templates need, made once, in Python.

The plan says what kind of decay the kernels implement, which raw tensors
feed which map, and which options are on. Templates branch on these fields
only; they never look at a sympy expression. The plan also carries the
expressions (the printer and the derivative code read them), keyed by the
names the templates use: fq, fk, fv, fa, fg, w (the bonus weight) and term
(the bonus term, written with `s` and `value`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import sympy

from ..spec.mixer import Mixer, shape_class
from ..spec.symbols import KEY, SCALAR, VALUE, Input, Operand, h, t

#: the expressions a plan holds; "w" and "term" exist only with a bonus
EXPR_NAMES = ("fq", "fk", "fv", "fa", "fg", "w", "term")
#: maps whose kernel tile is per key ([.., K]) whatever the map's own shape class
KEY_TILES = ("fq", "fk")
VALUE_TILES = ("fv", "fg")


@dataclasses.dataclass(frozen=True)
class OperandInfo:
    """A raw tensor as the kernels see it."""

    name: str
    is_input: bool          # per token (Input) or per head (Param)
    dim: Optional[str]      # "key", "value" or None (scalar per token / per head)
    grouped: bool = False   # [B, T, G, K] shared by H/G consecutive heads

    @property
    def layout(self) -> str:
        """key | value | scalar: the trailing dimension of its tensor."""
        return {KEY: "key", VALUE: "value", SCALAR: "scalar"}[self.dim]

    @property
    def axes(self) -> tuple[str, ...]:
        """The symbolic shape of its tensor, as spec.shapes.layout spells it."""
        if self.is_input:
            last = {"key": ("G" if self.grouped else "H", "K"), "value": ("H", "V"), "scalar": ("H",)}[self.layout]
            return ("B", "T") + last
        return {"key": ("H", "K"), "value": ("H", "V"), "scalar": ("H",)}[self.layout]

    @property
    def pointer(self) -> str:
        """The kernel argument holding its data (prefixed: operand names are user identifiers)."""
        return f"x_{self.name}"

    @property
    def tile(self) -> str:
        """The fp32 register tile a kernel loads it into."""
        return f"r_{self.name}"

    @property
    def grad(self) -> str:
        """The chain-rule kernel's output argument for its gradient."""
        return f"dx_{self.name}"


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    name: str
    content_hash: str
    decay: str                          # none | constant | scalar | key
    inclusive: bool                     # o_t reads S_t (else S_{t-1})
    normalize: bool                     # denominator, z carried in the state
    bonus: bool
    gate: bool                          # fg declared
    norm: Optional[str]                 # None | rms | layer
    scale: Optional[float]              # declared scale (None: K ** -0.5 at call time)
    operands: tuple[OperandInfo, ...]   # plan order: the order of `maps.args()` and CallContext.kernel_args()
    feeds: dict[str, tuple[str, ...]]   # expression name -> operand names it uses
    classes: dict[str, str]             # expression name -> key | value | scalar | constant
    exprs: dict[str, sympy.Expr]        # expression name -> sympy expression
    uses_t: bool                        # some expression uses the position t
    uses_h: bool                        # some expression uses the head index h

    # ---- derived views
    @property
    def operand_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.operands)

    @property
    def inputs(self) -> tuple[OperandInfo, ...]:
        return tuple(o for o in self.operands if o.is_input)

    @property
    def params(self) -> tuple[OperandInfo, ...]:
        return tuple(o for o in self.operands if not o.is_input)

    @property
    def grouped(self) -> tuple[str, ...]:
        """Grouped inputs, in plan order: each adds a `G_<name>: tl.constexpr` kernel argument."""
        return tuple(o.name for o in self.operands if o.grouped)

    @property
    def term_params(self) -> tuple[str, ...]:
        """Parameters inside the bonus term (their gradient needs do and s in the chain rule)."""
        return self.feeds.get("term", ())

    @property
    def has_epilogue(self) -> bool:
        """Whether y differs from o (a gate or a norm); otherwise y is o cast to the input dtype."""
        return self.gate or self.norm is not None

    @functools.cached_property
    def passthrough(self) -> dict[str, str]:
        """Features that are one raw input as-is (fq = q): feature name -> input name.

        Such an input's gradient is its feature gradient, so the chunked backward writes it in the
        input's dtype and the chain kernel neither reads nor writes it (three fp32 [B, T, H, K]
        tensors less, written and read again, for a mixer like GLA). Only an input that feeds no other
        expression, is not grouped, and has the feature's own last dimension qualifies. Computed once per
        plan: every backward call asks (ChunkCall.from_ctx, chainrule.raw_grads)."""
        dims = {"fq": "key", "fk": "key", "fv": "value"}
        users = {}
        for e, names in self.feeds.items():
            for n in names:
                users.setdefault(n, []).append(e)
        out = {}
        for f, dim in dims.items():
            e = self.exprs.get(f)
            if e is None or not isinstance(e, Operand):
                continue
            o = self.operand(e.name)
            if o.is_input and not o.grouped and o.layout == dim and users.get(o.name) == [f]:
                out[f] = o.name
        return out

    @functools.cached_property
    def row_maps(self) -> bool:
        """Whether fq or fk reads a per-row scalar input (mamba2's dt): a states walk that computes its maps then
        waits on them (codegen.chunk.walk_factors). Computed once per plan: every chunk call asks."""
        return any(o.is_input and o.layout == "scalar" for o in self.used_by(("fq", "fk")))

    def operand(self, name: str) -> OperandInfo:
        for o in self.operands:
            if o.name == name:
                return o
        raise KeyError(name)

    def used_by(self, which) -> tuple[OperandInfo, ...]:
        """Operands feeding any expression in `which`, in plan order."""
        names = {n for e in which for n in self.feeds.get(e, ())}
        return tuple(o for o in self.operands if o.name in names)

    def describe(self) -> str:
        lines = [f"plan for {self.name} (hash {self.content_hash})",
                 f"  decay={self.decay} inclusive={self.inclusive} normalize={self.normalize} "
                 f"bonus={self.bonus} gate={self.gate} norm={self.norm} uses_t={self.uses_t} uses_h={self.uses_h}"]
        for e in EXPR_NAMES:
            if e in self.exprs:
                lines.append(f"  {e:<4} [{self.classes[e]}] = {sympy.sstr(self.exprs[e])}"
                             f"    <- {', '.join(self.feeds[e]) or '(no operand)'}")
        return "\n".join(lines)


def _operand_info(o: Operand) -> OperandInfo:
    return OperandInfo(o.name, isinstance(o, Input), o.dim, bool(getattr(o, "grouped", False)))


def build_plan(mixer: Mixer) -> KernelPlan:
    exprs: dict[str, sympy.Expr] = {}
    for name in ("fq", "fk", "fv", "fa", "fg"):
        if name in mixer.maps:
            exprs[name] = mixer.maps[name]
    if mixer.bonus is not None:
        exprs["w"] = mixer.bonus.weight
        exprs["term"] = mixer.bonus.term
    feeds = {}
    for name, e in exprs.items():
        used = {x.name for x in e.free_symbols if isinstance(x, Operand)}
        feeds[name] = tuple(o.name for o in mixer.operands if o.name in used)
    classes = {name: (mixer.classes[name] if name in mixer.classes else shape_class(e)) for name, e in exprs.items()}
    # the bonus term is per value whenever it uses `value`; its own class ignores bonus symbols
    if "term" in exprs:
        classes["term"] = "value"
    symbols = set().union(*(e.free_symbols for e in exprs.values()))
    return KernelPlan(
        name=mixer.name,
        content_hash=mixer.content_hash,
        decay=mixer.decay_kind,
        inclusive=mixer.inclusive,
        normalize=mixer.normalize,
        bonus=mixer.bonus is not None,
        gate="fg" in exprs,
        norm=mixer.norm,
        scale=mixer.scale,
        operands=tuple(_operand_info(o) for o in mixer.operands),
        feeds=feeds,
        classes=classes,
        exprs=exprs,
        uses_t=t in symbols,
        uses_h=h in symbols,
    )


__all__ = ["EXPR_NAMES", "KEY_TILES", "VALUE_TILES", "KernelPlan", "OperandInfo", "build_plan"]
