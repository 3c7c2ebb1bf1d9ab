"""random_inputs(natural=True): a system's own Param values where random ones make its checks ill-conditioned."""
import torch

import mixforge as mf
from mixforge.spec.reference import evaluate_maps, recurrence
from mixforge.spec.shapes import REFERENCE_DTYPES, resolve_call
from mixforge.spec.testing import random_inputs


def _fp32_formula_error(mixer, x) -> float:
    r64 = recurrence(mixer, **{n: t.double() for n, t in x.items()})
    r32 = recurrence(mixer, compute_dtype=torch.float32, **{n: t.float() for n, t in x.items()})
    return ((r32.y.double() - r64.y).norm() / r64.y.norm()).item()


def test_cosformer_natural_params_keep_features_nonnegative_and_the_check_well_conditioned():
    m = mf.zoo.cosformer
    x = random_inputs(m, B=1, T=512, H=2, K=16, V=8, seed=0, natural=True)
    maps = evaluate_maps(m, x, resolve_call(m, x, dtypes=REFERENCE_DTYPES))
    # >= 0 up to pi/2 rounded to the float32 parameter (cos(-fl(pi/2)) = -4e-8)
    assert (maps.q > -1e-6).all() and (maps.k > -1e-6).all()
    assert _fp32_formula_error(m, x) < 1e-5
    # random phases and frequencies: features of both signs, a denominator near zero somewhere
    x = random_inputs(m, B=1, T=512, H=2, K=16, V=8, seed=0)
    assert _fp32_formula_error(m, x) > 1e-4


def test_natural_is_a_no_op_for_systems_that_declare_nothing():
    a = random_inputs(mf.zoo.gla, B=1, T=16, H=2, K=8, V=8, seed=3, natural=True)
    b = random_inputs(mf.zoo.gla, B=1, T=16, H=2, K=8, V=8, seed=3)
    assert all(torch.equal(a[n], b[n]) for n in a)
