"""The code behind the template holes: `templates/_maps.jinja` delegates to these methods.

One `Emitter` per rendered module. A kernel loads per-token inputs either
for one token (token tiles, `mask=None`, `rows` a scalar index) or for a
block of rows (`rows` an index vector, `mask` its validity):

    tile              token      rows
    per key           [BK]       [BT, BK]
    per value         [BV]       [BT, BV]
    scalar per token  0-d        [BT, 1]
    parameters        [BK] / [BV] / 0-d (both; they broadcast against rows)

so every printed expression broadcasts without reshaping. `compute` then
returns full tiles, zero outside the valid region: b_fq, b_fk [.., BK],
b_fv, b_fg [.., BV], b_fa with the decay's shape (key: like b_fk; scalar:
0-d / [BT]; constant: 0-d), b_w [BK] (from load_params).

The kernel provides `i_h`, `H`, `K`, `V`, `o_k`/`m_k`, `o_v`/`m_v`, and
`bos`, the first row of the sequence (the position t of a row is
`row - bos`; rows from several sequences need `bos` of shape [BT, 1]).
Names the holes define: `x_<name>` (operand pointers), `r_<name>`
(parameter tiles), `r<n>_<name>` (per-token tiles of the n-th load), `f_h`,
`f_t<n>` (h, t as fp32), `b_*` above, `b_term`, `b_dts`, `b_dtv`, `g_*`
(the chain kernel's feature gradients) and temporaries `_e<n>_<i>`.
Templates keep clear of these names; load_ahead's variables take the prefix
the template gives.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import sympy

from ..spec.symbols import h as H_SYMBOL
from ..spec.symbols import s as S_SYMBOL
from ..spec.symbols import t as T_SYMBOL
from ..spec.symbols import value as VALUE_SYMBOL
from .derivatives import GRAD, bonus_partials, chain_rule, operand_symbol
from .plan import KernelPlan, OperandInfo
from .printer import print_cse

#: the maps a kernel computes, in the order `compute` emits them
MAP_ORDER = ("fq", "fk", "fv", "fa", "fg", "w")
#: `which` may also be written as letters: "qkva"
LETTERS = {"q": "fq", "k": "fk", "v": "fv", "a": "fa", "g": "fg", "w": "w"}


class Emitter:
    def __init__(self, plan: KernelPlan):
        self.plan = plan
        self._counter = itertools.count()
        # what the last load_rows loaded: compute and bonus work on those tiles
        self._mask: Optional[str] = None
        self._which: tuple[str, ...] = ()
        self._tiles: dict[str, str] = {}
        self._t: Optional[str] = None

    # ------------------------------------------------------------------ helpers
    def maps(self, which) -> tuple[str, ...]:
        """Normalize `which` (None: all maps; names like ["fq", "fa"]; or letters "qkva") to declared maps."""
        if which is None:
            names = MAP_ORDER
        elif isinstance(which, str):
            names = (which,) if which in MAP_ORDER else tuple(LETTERS.get(c, c) for c in which)
        else:
            names = tuple(which)
        unknown = [w for w in names if w not in MAP_ORDER + ("term",)]
        if unknown:
            raise ValueError(f"unknown map {unknown[0]!r}: maps are {', '.join(MAP_ORDER)} (letters {''.join(LETTERS)})")
        return tuple(w for w in MAP_ORDER + ("term",) if w in names and w in self.plan.exprs)

    def _n(self) -> int:
        return next(self._counter)

    def names(self, s_code: str = "b_s") -> dict[sympy.Symbol, str]:
        """Symbol -> code for printing: operands (as last loaded), h, t, bonus symbols, gradient stand-ins."""
        out: dict[sympy.Symbol, str] = {}
        for o in self.plan.operands:
            out[operand_symbol(self.plan, o.name)] = self._tiles.get(o.name, o.tile)
        out[H_SYMBOL] = "f_h"
        if self._t is not None:
            out[T_SYMBOL] = self._t
        out[S_SYMBOL] = s_code
        out[VALUE_SYMBOL] = "b_fv"
        out.update({g: f"g_{name}" for name, g in GRAD.items()})
        return out

    def _uses(self, which, symbol) -> bool:
        return any(symbol in self.plan.exprs[w].free_symbols for w in which)

    def masks(self, mask=None) -> tuple[str, str, Optional[str]]:
        """(key-tile mask, value-tile mask, row mask) for token tiles (mask None) or rows."""
        if mask is None:
            return "m_k", "m_v", None
        return f"{mask}[:, None] & m_k[None, :]", f"{mask}[:, None] & m_v[None, :]", mask

    # ------------------------------------------------------------------ holes
    def args(self) -> str:
        """Kernel arguments: operand pointers in plan order, then G_<name> for grouped inputs."""
        return ", ".join([o.pointer for o in self.plan.operands] +
                         [f"G_{n}: tl.constexpr" for n in self.plan.grouped])

    def grad_args(self) -> str:
        """The chain-rule kernel's gradient outputs, in plan order (not the passthrough inputs')."""
        direct = set(self.plan.passthrough.values())
        return ", ".join(o.grad for o in self.plan.operands if o.name not in direct)

    def load_params(self, which=None) -> str:
        """Parameters of head i_h feeding `which` (default: all), f_h, and the bonus weight b_w [BK]."""
        which = self.maps(which) + (("term",) if which is None and "term" in self.plan.exprs else ())
        lines = [f"{o.tile} = {self._param_load(o)}" for o in self.plan.used_by(which) if not o.is_input]
        if self._uses(which, H_SYMBOL):
            lines.append("f_h = i_h.to(tl.float32)")
        if "w" in which:
            temps, (code,) = print_cse([self.plan.exprs["w"]], self.names(), f"_e{self._n()}_")
            lines += [f"# bonus weight w = {sympy.sstr(self.plan.exprs['w'])}"] + temps
            lines.append(f"b_w = tl.where(m_k, {code}, 0.0)")
        return "\n".join(lines)

    @staticmethod
    def _param_load(o: OperandInfo) -> str:
        if o.layout == "scalar":
            return f"tl.load({o.pointer} + i_h).to(tl.float32)"
        n, off, m = ("K", "o_k", "m_k") if o.layout == "key" else ("V", "o_v", "m_v")
        return f"tl.load({o.pointer} + i_h * {n} + {off}, mask={m}, other=0.0).to(tl.float32)"

    def load_rows(self, rows: str, mask, which=None, only=None, ahead=None) -> str:
        """Per-token inputs feeding `which`: one token (mask None, `rows` a scalar) or a block of rows.

        `only` (operand names) restricts the loads further: the chain kernel loads what its partials use.
        `ahead` (a name prefix): the per-row scalar inputs were loaded before, by load_ahead with that prefix.
        """
        which = self.maps(which)
        n = self._n()
        self._mask, self._which = mask, which
        self._tiles, self._t = {}, None
        if mask is None:   # one token: the kernel's index (int64 on the GPU, a Python int in the interpreter)
            row, lines = (rows if rows.isidentifier() else f"({rows})"), []
        else:              # int64 offsets: B*T*H*K can pass 2**31
            row, lines = f"r{n}_row", [f"r{n}_row = ({rows}).to(tl.int64)[:, None]"]
        for o in self.plan.used_by(which):
            if o.is_input and (only is None or o.name in only):
                if ahead and self._loads_ahead(o):
                    self._tiles[o.name] = f"{ahead}{o.name}"
                    continue
                self._tiles[o.name] = f"r{n}_{o.name}"
                lines.append(f"r{n}_{o.name} = {self._row_load(o, row, mask)}")
        if self._uses(which, T_SYMBOL) and (only is None or "t" in only):
            self._t = f"f_t{n}"
            lines.append(f"f_t{n} = ({row} - bos).to(tl.float32)")
        return "\n".join(lines) if self._tiles or self._t else ""

    def load_ahead(self, rows: str, mask: str, which, prefix: str) -> str:
        """The per-row scalar inputs feeding `which` (one value a row: 2 bytes a row apart in 16-bit inputs,
        which the pipeliner's async copies cannot take) at a block of rows, into <prefix><name>: a serial walk
        loads the next chunk's during this one's step, so that their latency is not on the walk's path."""
        row = f"({rows}).to(tl.int64)[:, None]"
        return "\n".join(f"{prefix}{o.name} = {self._row_load(o, row, f'({mask})')}"
                         for o in self.plan.used_by(self.maps(which)) if self._loads_ahead(o))

    @staticmethod
    def _loads_ahead(o: OperandInfo) -> bool:
        """Whether load_ahead loads `o` (and load_rows with `ahead` takes it from there): a per-row scalar input."""
        return o.is_input and o.layout == "scalar"

    @staticmethod
    def _row_load(o: OperandInfo, row: str, mask) -> str:
        head = f"{row} * G_{o.name} + i_h // (H // G_{o.name})" if o.grouped else f"{row} * H + i_h"
        if o.layout == "scalar":
            m = "" if mask is None else f", mask={mask}[:, None], other=0.0"
            return f"tl.load({o.pointer} + {head}{m}).to(tl.float32)"
        n, off, m = ("K", "o_k", "m_k") if o.layout == "key" else ("V", "o_v", "m_v")
        if mask is not None:
            off, m = f"{off}[None, :]", f"{mask}[:, None] & {m}[None, :]"
        return f"tl.load({o.pointer} + ({head}) * {n} + {off}, mask={m}, other=0.0).to(tl.float32)"

    def compute(self, which=None) -> str:
        """b_<map> for the maps in `which` (default: those of the last load_rows), on the tiles it loaded.

        fq and fk are full key tiles and fv, fg full value tiles whatever
        their own shape class (a scalar fk is broadcast over K). fa keeps the
        decay's shape: key tile, per-token scalar (0-d / [BT]) or per-head 0-d.
        """
        which = tuple(w for w in (self._which if which is None else self.maps(which)) if w not in ("w", "term"))
        if not which:
            return ""
        key_m, val_m, row_m = self.masks(self._mask)
        lines = [f"# {w} = {sympy.sstr(self.plan.exprs[w])}" for w in which]
        temps, codes = print_cse([self.plan.exprs[w] for w in which], self.names(), f"_e{self._n()}_")
        lines += temps
        for w, code in zip(which, codes):
            if w in ("fq", "fk"):
                lines.append(f"b_{w} = tl.where({key_m}, {code}, 0.0)")
            elif w in ("fv", "fg"):
                lines.append(f"b_{w} = tl.where({val_m}, {code}, 0.0)")
            elif self.plan.decay == "key":
                lines.append(f"b_fa = tl.where({key_m}, {code}, 0.0)")
            elif self.plan.decay == "scalar" and row_m is not None:
                # per-token tiles are [BT, 1]; the decay of a row block is a [BT] vector
                lines.append(f"b_fa = _sum(tl.where({row_m}[:, None], {code}, 0.0), axis=1)")
            elif not self.plan.exprs["fa"].free_symbols:   # a numeric decay: a tensor, so tl.exp accepts it
                lines.append(f"b_fa = tl.full([], {code}, tl.float32)")
            else:
                lines.append(f"b_fa = {code}")
        return "\n".join(lines)

    def _s(self, s: Optional[str]) -> str:
        """Code for s broadcasting against b_fv: b_s is 0-d per token, [BT] on rows."""
        if s is not None:
            return s
        return "b_s" if self._mask is None else "b_s[:, None]"

    def bonus(self, s: Optional[str] = None) -> str:
        """b_term = term(s, b_fv), zero outside the value tile (uses b_s and b_fv; params from load_params)."""
        _, val_m, _ = self.masks(self._mask)
        temps, (code,) = print_cse([self.plan.exprs["term"]], self.names(self._s(s)), f"_e{self._n()}_")
        return "\n".join([f"# bonus term = {sympy.sstr(self.plan.exprs['term'])}"] + temps +
                         [f"b_term = tl.where({val_m}, {code}, 0.0)"])

    def bonus_grads(self, s: Optional[str] = None) -> str:
        """b_dts, b_dtv: d term / d s and d term / d value on the value tile, zero outside it."""
        _, val_m, _ = self.masks(self._mask)
        temps, (ds, dv) = print_cse(bonus_partials(self.plan), self.names(self._s(s)), f"_e{self._n()}_")
        return "\n".join(temps + [f"b_dts = tl.where({val_m}, {ds}, 0.0)", f"b_dtv = tl.where({val_m}, {dv}, 0.0)"])

    def code(self, targets, s: Optional[str] = None) -> str:
        """`target = expr` lines for (target, sympy expr) pairs, with cse, on the last loaded tiles."""
        targets = list(targets)
        temps, codes = print_cse([e for _, e in targets], self.names(self._s(s)), f"_e{self._n()}_")
        return "\n".join(temps + [f"{name} = {c}" for (name, _), c in zip(targets, codes)])

    # ------------------------------------------------------------------ the chain-rule kernel
    def chain(self) -> "ChainPlan":
        """What the chain kernel computes: per operand, one tile variable per group of feature gradients."""
        operands, targets = [], []
        direct = set(self.plan.passthrough.values())   # the chunked backward writes these itself
        for og in chain_rule(self.plan):
            if not og.contributions or og.operand.name in direct:
                continue
            parts = []
            for c in og.contributions:
                var = f"d_{og.operand.name}_{c.group}"
                parts.append(ChainPart(c.group, var))
                targets.append((var, c.expr))
            operands.append(ChainOperand(og.operand, tuple(parts)))
        symbols = set().union(*(e.free_symbols for _, e in targets)) if targets else set()
        grads = tuple(name for name, g in GRAD.items() if g in symbols)
        needs_s = S_SYMBOL in symbols or VALUE_SYMBOL in symbols
        inputs = {o.name for o in self.plan.inputs if operand_symbol(self.plan, o.name) in symbols}
        if needs_s:   # s = scale * fq . (w * fk) and the value fv are recomputed from the raw inputs
            inputs |= {o.name for o in self.plan.used_by(("fq", "fk", "fv")) if o.is_input}
        if T_SYMBOL in symbols or (needs_s and self._uses(("fq", "fk", "fv"), T_SYMBOL)):
            inputs.add("t")
        return ChainPlan(tuple(operands), tuple(targets), grads, needs_s,
                         tuple(n for n in self.plan.operand_names + ("t",) if n in inputs))


@dataclasses.dataclass(frozen=True)
class ChainPart:
    group: str     # derivatives.GROUPS
    var: str       # the tile variable holding sum_f df * df/dr for this group


@dataclasses.dataclass(frozen=True)
class ChainOperand:
    op: OperandInfo
    parts: tuple[ChainPart, ...]


@dataclasses.dataclass(frozen=True)
class ChainPlan:
    operands: tuple[ChainOperand, ...]       # operands with a nonzero gradient
    targets: tuple[tuple[str, sympy.Expr], ...]
    grads: tuple[str, ...]                   # feature gradients the partials use: fq fk fv fa fg w do
    needs_s: bool                            # a parameter inside the bonus term: s and fv are recomputed
    inputs: tuple[str, ...]                  # per-token inputs to load (and "t" when the position is needed)
