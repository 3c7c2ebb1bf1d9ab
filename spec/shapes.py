"""Checking a call's tensors against a Mixer, before anything is computed.

Shared by the reference and the compiled ops, so both reject the same bad
input with the same message. Every message names the argument and what was
expected; nothing is broadcast or cast here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch

from .errors import CallError
from .mixer import Mixer
from .symbols import KEY, SCALAR, VALUE, Input, Operand

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


@dataclasses.dataclass(frozen=True)
class CallShapes:
    B: int
    T: int
    H: int
    K: int
    V: int
    N: int                      # independent sequences: B, or len(cu_seqlens) - 1
    groups: tuple[tuple[str, int], ...]  # (grouped input, G)
    dtype: torch.dtype          # of the per-token inputs
    device: torch.device
    varlen: bool

    def group(self, name: str) -> int:
        return dict(self.groups)[name]


def layout(o: Operand) -> tuple[str, ...]:
    """The symbolic shape an operand's tensor must have."""
    if isinstance(o, Input):
        return {KEY: ("B", "T", "G" if o.grouped else "H", "K"), VALUE: ("B", "T", "H", "V"),
                SCALAR: ("B", "T", "H")}[o.dim]
    return {KEY: ("H", "K"), VALUE: ("H", "V"), SCALAR: ("H",)}[o.dim]


def _fmt(names: Iterable[str]) -> str:
    return ", ".join(names) or "(none)"


def check_names(mixer: Mixer, given: dict[str, Any]) -> None:
    expected = [o.name for o in mixer.operands]
    missing = [n for n in expected if n not in given or given[n] is None]
    extra = [n for n in given if n not in expected]
    if missing:
        raise CallError(f"missing input {missing[0]!r}: mixer {mixer.name!r} takes {_fmt(expected)}")
    if extra:
        raise CallError(f"unexpected input {extra[0]!r}: mixer {mixer.name!r} takes {_fmt(expected)}")


def resolve_call(mixer: Mixer, tensors: dict[str, Any], *, initial_state=None, cu_seqlens=None,
                 dtypes: tuple = KERNEL_DTYPES, state_dtypes: tuple = (torch.float32,)) -> CallShapes:
    check_names(mixer, tensors)
    dims: dict[str, int] = {}
    source: dict[str, str] = {}
    device = None
    dtype = None
    ops = sorted(mixer.operands, key=lambda o: (o.grouped, not isinstance(o, Input)))
    for o in ops:
        x = tensors[o.name]
        if not isinstance(x, torch.Tensor):
            raise CallError(f"{o.name}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise CallError(f"{o.name}: expected a floating-point tensor, got {x.dtype}")
        if device is None:
            device = x.device
        elif x.device != device:
            raise CallError(f"{o.name}: expected device {device} like {ops[0].name}, got {x.device}")
        if isinstance(o, Input):
            if x.dtype not in dtypes:
                raise CallError(f"{o.name}: dtype {x.dtype} is not supported; expected one of "
                                f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}")
            if dtype is None:
                dtype = x.dtype
            elif x.dtype != dtype:
                raise CallError(f"{o.name}: dtype {x.dtype} differs from the other inputs' {dtype}; "
                                "pass all inputs in one dtype")
        elif x.dtype not in dtypes + (torch.float64,):
            raise CallError(f"{o.name}: dtype {x.dtype} is not supported for a parameter")
        names = layout(o)
        if x.dim() != len(names):
            raise CallError(f"{o.name}: expected {len(names)} dims [{', '.join(names)}], got shape {list(x.shape)}")
        for sym, size in zip(names, x.shape):
            if sym == "G":
                continue
            if sym not in dims:
                dims[sym], source[sym] = int(size), o.name
            elif dims[sym] != size:
                want = [dims.get(n, n) for n in names]
                raise CallError(
                    f"{o.name}: expected shape [{', '.join(names)}] = {want} ({sym} = {dims[sym]} from "
                    f"{source[sym]}), got {list(x.shape)}"
                )
    if dtype is None:  # a mixer with parameters only cannot be called
        raise CallError(f"mixer {mixer.name!r} has no per-token input")
    B, T, H = dims["B"], dims["T"], dims.get("H")
    if H is None:  # only grouped per-key inputs: heads cannot be inferred
        raise CallError("cannot infer the number of heads: give at least one input or parameter per head")
    K, V = dims.get("K", 1), dims.get("V", 1)
    groups = []
    for o in mixer.inputs:
        if o.grouped:
            G = tensors[o.name].shape[2]
            if G < 1 or H % G:
                raise CallError(f"{o.name}: the group count {G} (dim 2) must divide the number of heads H = {H}")
            groups.append((o.name, int(G)))
    if H < 1 or K < 1 or V < 1:
        raise CallError(f"H, K and V must be positive, got H={H}, K={K}, V={V}")

    N, varlen = B, False
    if cu_seqlens is not None:
        N = check_cu_seqlens(cu_seqlens, B, T, device)
        varlen = True
    if initial_state is not None:
        check_state("initial_state", initial_state, mixer, N, H, K, V, device, state_dtypes)
    return CallShapes(B, T, H, K, V, N, tuple(groups), dtype, device, varlen)


def check_cu_seqlens(cu: Any, B: int, T: int, device) -> int:
    if not isinstance(cu, torch.Tensor):
        raise CallError(f"cu_seqlens: expected a 1-D integer tensor, got {type(cu).__name__}")
    if cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        raise CallError(f"cu_seqlens: expected a 1-D int32 or int64 tensor, got {cu.dtype} of shape {list(cu.shape)}")
    if cu.device != device:
        raise CallError(f"cu_seqlens: expected device {device}, got {cu.device}")
    if B != 1:
        raise CallError(f"cu_seqlens: varlen batches need B = 1 (sequences packed along T), got B = {B}")
    if cu.numel() < 2:
        raise CallError(f"cu_seqlens: expected at least 2 entries [0, ..., T], got {cu.numel()}")
    vals = cu.tolist()
    if vals[0] != 0:
        raise CallError(f"cu_seqlens: must start at 0, got {vals[0]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        i = next(i for i, (a, b) in enumerate(zip(vals, vals[1:])) if b < a)
        raise CallError(f"cu_seqlens: must be non-decreasing, but entry {i + 1} ({vals[i + 1]}) < entry {i} ({vals[i]})")
    if vals[-1] != T:
        raise CallError(f"cu_seqlens: must end at T = {T}, got {vals[-1]}")
    return len(vals) - 1


def state_layout(mixer: Mixer, N: int, H: int, K: int, V: int) -> tuple:
    if mixer.normalize:
        return ((N, H, K, V), (N, H, K))
    return (N, H, K, V)


def check_state(name: str, state: Any, mixer: Mixer, N, H, K, V, device, state_dtypes) -> None:
    want = state_layout(mixer, N, H, K, V)
    if mixer.normalize:
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            raise CallError(f"{name}: mixer {mixer.name!r} normalizes, so its state is a pair (S [N, H, K, V], "
                            f"z [N, H, K]) = {[list(w) for w in want]}")
        parts = list(zip(("S", "z"), state, want))
    else:
        parts = [("", state, want)]
    for part, x, shape in parts:
        label = f"{name}[{'0' if part == 'S' else '1'}] ({part})" if part else name
        if not isinstance(x, torch.Tensor):
            raise CallError(f"{label}: expected a tensor of shape {list(shape)}, got {type(x).__name__}")
        if tuple(x.shape) != tuple(shape):
            axes = "[N, H, K, V]" if len(shape) == 4 else "[N, H, K]"
            raise CallError(f"{label}: expected shape {axes} = {list(shape)}, got {list(x.shape)}")
        if x.dtype not in state_dtypes:
            raise CallError(f"{label}: expected dtype {' or '.join(str(d) for d in state_dtypes)}, got {x.dtype}")
        if x.device != device:
            raise CallError(f"{label}: expected device {device}, got {x.device}")


def segments(shapes: CallShapes, cu_seqlens) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence."""
    if cu_seqlens is None:
        return [(b, 0, shapes.T) for b in range(shapes.B)]
    vals = cu_seqlens.tolist()
    return [(0, a, b) for a, b in zip(vals, vals[1:])]
