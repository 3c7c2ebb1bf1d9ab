"""`mixforge demo`: the first thing a new user runs.

It declares a new variant in a few lines, prints its five maps, and checks
the float64 recurrence against the implicit attention map on random inputs.
"""
from __future__ import annotations

from pathlib import Path

import torch

import mixforge as mf
from mixforge import Bonus, Input, Mixer, Param, s, value
from mixforge.functions import logsigmoid, sigmoid, silu


def declare_variant() -> Mixer:
    """A variant no library ships: GLA's per-key decay, a key tied to it, and a gated bonus."""
    q, a = Input("q"), Input("a")
    v, g = Input("v", dim="value"), Input("g", dim="value")
    decay = logsigmoid(a) / 8
    return Mixer("tied_gla", fq=q, fk=1 - sigmoid(a), fv=v, fa=decay, fg=silu(g), norm="rms",
                 bonus=Bonus(weight=Param("u"), term=sigmoid(s) * value))


def check_parallel_form(mixer: Mixer, seed: int = 0) -> float:
    """max |o_recurrent - (M v + nonlinear bonus)| on random inputs, float64."""
    from mixforge.spec.reference import bonus_term, evaluate_maps, recurrence
    from mixforge.spec.shapes import REFERENCE_DTYPES, resolve_call
    from mixforge.spec.testing import random_inputs

    x = random_inputs(mixer, B=2, T=24, H=2, K=8, V=8, dtype=torch.float64, seed=seed)
    rec = recurrence(mixer, **x)
    M = mf.attention_map(mixer, **x)
    maps = evaluate_maps(mixer, x, resolve_call(mixer, x, dtypes=REFERENCE_DTYPES))
    o = torch.einsum("bhts,bshv->bthv", M, maps.v)
    if mixer.bonus is not None and mixer.bonus.linear_coefficient is None:
        o = o + bonus_term(mixer, maps, x)
    return (o - rec.o).abs().max().item()


def run_demo(out_dir: str = "mixforge-demo", quick: bool = False) -> int:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    mixer = declare_variant()
    print(mixer.describe())
    err = check_parallel_form(mixer)
    print(f"\nrecurrence vs implicit attention map (float64): max abs difference {err:.2e}")
    return 0 if err < 1e-9 else 1
