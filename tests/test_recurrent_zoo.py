"""Every zoo mixer on the recurrent path: outputs, final state and every gradient vs the float64 reference."""
import pytest

import mixforge as mf
from mixforge.spec.testing import random_inputs

from helpers_codegen import check_call, random_state

B, T, H, K, V = 2, 13, 2, 6, 5   # T a prime, K and V not powers of two and K != V


@pytest.fixture(scope="module")
def compiled():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = mf.compile(mf.zoo.ALL[name])
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(mf.zoo.ALL))
def test_zoo_recurrent_matches_reference(name, compiled):
    mixer = mf.zoo.ALL[name]
    ops = compiled(name)
    x = random_inputs(mixer, B=B, T=T, H=H, K=K, V=V, seed=7)
    K_ = next((t.shape[-1] for o, t in ((o, x[o.name]) for o in mixer.operands) if o.dim == "key"), 1)
    check_call(mixer, ops.recurrent, x, initial_state=random_state(mixer, B, H, K_, V, seed=3))
