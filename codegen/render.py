"""Rendering: a KernelPlan and the templates -> the Python source of one module per mixer.

The Jinja2 environment is strict (an undefined name is an error, never an
empty string). Templates see `plan` (also as `chunk`, the name the chunked
templates use), `maps` (the holes of `_maps.jinja`), `emit` (the Emitter
behind them), `helpers` (the printer's elementwise helpers) and `version`.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import jinja2

from .emit import Emitter
from .plan import KernelPlan
from .printer import HELPERS

MODULE_TEMPLATE = "module.py.jinja"
#: what `block` renders for a hole with nothing to emit; `_tidy` drops these lines
EMPTY = "# <empty hole>"


def templates_dir() -> Path:
    import mixforge.templates as templates   # a folder of package data: plain or namespace package

    return Path(next(iter(templates.__path__)))


def block(text, width: int) -> str:
    """A hole or macro output placed as a block of statements indented by `width`.

    Trailing newlines go (a macro body ends with one); an empty block leaves
    a marker line that `_tidy` removes, instead of a stray blank line.
    """
    text = str(text).strip("\n")
    if not text.strip():
        return " " * width + EMPTY
    return "\n".join((" " * width + line) if line.strip() else "" for line in text.split("\n"))


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["block"] = block
    return env


def _version() -> str:
    import mixforge

    return mixforge.__version__


def render_module(plan: KernelPlan) -> str:
    """The generated module's source; checked to parse, so a template bug fails here, not at import."""
    env = environment()
    emit = Emitter(plan)
    maps = env.get_template("_maps.jinja").make_module({"emit": emit})
    source = env.get_template(MODULE_TEMPLATE).render(
        plan=plan, chunk=plan, maps=maps, emit=emit, helpers=HELPERS.strip() + "\n", version=_version())
    source = _tidy(source)
    try:
        ast.parse(source)
    except SyntaxError as e:
        lines = source.splitlines()
        around = "\n".join(f"{i + 1:5d}  {lines[i]}" for i in range(max(0, e.lineno - 4), min(len(lines), e.lineno + 3)))
        raise SyntaxError(f"generated module for {plan.name} does not parse: {e.msg} at line {e.lineno}\n{around}") from None
    return source


def _tidy(source: str) -> str:
    """No empty-hole markers, no trailing spaces, at most two blank lines in a row."""
    out, blank = [], 0
    for line in source.splitlines():
        line = line.rstrip()
        if line.strip() == EMPTY:
            continue
        blank = blank + 1 if not line else 0
        if blank <= 2:
            out.append(line)
    return "\n".join(out).strip() + "\n"


def kernel_source(module_source: str, name: str) -> str:
    """The source of one kernel (`recurrent_fwd` or `recurrent_fwd_kernel`) of a generated module."""
    target = name if name.endswith("_kernel") else f"{name}_kernel"
    tree = ast.parse(module_source)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == target:
            lines = module_source.splitlines()
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            return "\n".join(lines[start:node.end_lineno]) + "\n"
    kernels = sorted(n.name[:-len("_kernel")] for n in tree.body
                     if isinstance(n, ast.FunctionDef) and n.name.endswith("_kernel"))
    raise KeyError(f"no kernel {name!r} in this module; kernels: {', '.join(kernels)}")
