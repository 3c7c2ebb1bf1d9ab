"""Rendering: every zoo mixer's module renders, parses and reads well; the holes emit what they promise."""
import ast

import jinja2
import pytest

import mixforge as mf
from mixforge.codegen.emit import Emitter
from mixforge.codegen.plan import build_plan
from mixforge.codegen.render import EMPTY, environment, kernel_source, render_module

KERNELS = {"chain_kernel", "recurrent_fwd_kernel", "recurrent_bwd_kernel", "step_kernel"}


@pytest.mark.parametrize("name", list(mf.zoo.ALL))
def test_every_zoo_module_renders(name):
    plan = build_plan(mf.zoo.ALL[name])
    src = render_module(plan)
    tree = ast.parse(src)
    kernels = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.endswith("_kernel")}
    assert KERNELS <= kernels
    assert ("epilogue_fwd_kernel" in kernels) == plan.has_epilogue
    assert EMPTY not in src and "\n\n\n\n" not in src and not any(line != line.rstrip() for line in src.splitlines())
    assert render_module(plan) == src   # deterministic: the cache file name is its hash


def test_kernel_source_extraction():
    src = render_module(build_plan(mf.zoo.gla))
    step = kernel_source(src, "step")
    assert step.startswith("@triton.jit\ndef step_kernel(") and "def recurrent" not in step
    with pytest.raises(KeyError, match="no kernel 'x'"):
        kernel_source(src, "x")


def test_templates_are_strict():
    with pytest.raises(jinja2.UndefinedError):
        environment().from_string("{{ missing }}").render()


def test_args_hole_orders_operands_and_adds_group_counts():
    e = Emitter(build_plan(mf.zoo.mamba2))
    assert e.args() == "x_C, x_B, x_dt, x_dt_bias, x_x, x_A_log, G_C: tl.constexpr, G_B: tl.constexpr"
    # x is fv as-is: the chunked backward writes its gradient, the chain kernel has no output for it
    assert e.grad_args() == "dx_C, dx_B, dx_dt, dx_dt_bias, dx_A_log"


def test_load_rows_for_a_token_and_for_rows():
    e = Emitter(build_plan(mf.zoo.mamba2))
    token = e.load_rows("i_t", None, "qk")
    assert "x_B + (i_t * G_B + i_h // (H // G_B)) * K + o_k, mask=m_k" in token
    assert "x_dt + i_t * H + i_h)" in token and "x_x" not in token     # only what fq, fk use
    rows = e.load_rows("rows", "m_t", ["fa"])
    assert "mask=m_t[:, None], other=0.0" in rows and "x_B" not in rows
    # the scalar decay of a row block is a [BT] vector
    assert "b_fa = _sum(tl.where(m_t[:, None]," in e.compute()


def test_compute_masks_and_broadcasts_to_full_tiles():
    e = Emitter(build_plan(mf.zoo.rwkv4))
    e.load_rows("i_t", None, "qkvag")
    code = e.compute()
    assert "b_fq = tl.where(m_k, 1.0, 0.0)" in code        # a constant map, broadcast and zero-padded
    assert "b_fk = tl.where(m_k, tl.exp(r" in code           # a scalar map over K
    assert "b_fa = -tl.exp(r_w)" in code                     # a constant decay stays per head
    assert "b_w = tl.where(m_k, tl.exp(r_u), 0.0)" in e.load_params()


def test_position_symbol_reads_bos():
    e = Emitter(build_plan(mf.zoo.cosformer))
    code = e.load_rows("rows", "m_t", "qk")
    assert "- bos).to(tl.float32)" in code
    assert "tl.cos(f_t" in e.compute()


def test_unknown_map_name():
    with pytest.raises(ValueError, match="unknown map 'fz'"):
        Emitter(build_plan(mf.zoo.gla)).compute(["fz"])
