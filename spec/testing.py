"""Random inputs for a Mixer: used by the tests, the demo, the tuner's checks and the benchmarks.

Values are random (never zeros), scaled so that maps stay in a sane range;
`decay` shifts decay inputs so that log-decays are strong (about -20 at most
with decay="strong") or mild.
"""
from __future__ import annotations

import torch

from .mixer import Mixer
from .symbols import KEY, SCALAR, VALUE, Input


def operand_shape(o, B, T, H, K, V, G=1) -> tuple[int, ...]:
    if isinstance(o, Input):
        return {KEY: (B, T, G if o.grouped else H, K), VALUE: (B, T, H, V), SCALAR: (B, T, H)}[o.dim]
    return {KEY: (H, K), VALUE: (H, V), SCALAR: (H,)}[o.dim]


def random_inputs(mixer: Mixer, B: int = 2, T: int = 32, H: int = 2, K: int = 16, V: int = 16, *, G: int = 1,
                  dtype=torch.float32, param_dtype=None, device="cpu", seed: int | None = None,
                  decay: str = "normal", requires_grad: bool = False, natural: bool = False) -> dict[str, torch.Tensor]:
    """A dict of every Input and Param of `mixer`, ready for `ops.chunk(**x)` or `reference(mixer, **x)`.

    decay: "normal" (randn), "strong" (decay inputs pushed so log-decays reach about -20),
    or "weak" (log-decays near 0).
    natural: Params at the values the system itself uses where it declares them (zoo.NATURAL_PARAMS):
    random ones can leave a normalized mixer's denominator without a sign (cosformer), which makes every
    check of it ill-conditioned.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(torch.seed() if seed is None else seed)
    param_dtype = param_dtype or (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    raw = {o.name: torch.randn(operand_shape(o, B, T, H, K, V, G), generator=gen, dtype=torch.float64)
           for o in mixer.operands}
    if decay != "normal" and "fa" in mixer.maps:
        raw = _push_decay(mixer, raw, target=-20.0 if decay == "strong" else -0.1)
    if natural:
        from .zoo import NATURAL_PARAMS

        fix = NATURAL_PARAMS.get(mixer.content_hash)
        if fix is not None:
            raw.update(fix(H=H, K=K, T=T))
    out = {}
    for o in mixer.operands:
        x = raw[o.name].to(dtype if isinstance(o, Input) else param_dtype).to(device)
        out[o.name] = x.requires_grad_(requires_grad)
    return out


def _push_decay(mixer: Mixer, raw: dict, target: float) -> dict:
    """Shift the decay's operands so that the most negative log-decay is about `target`."""
    import sympy

    from .reference import evaluate_maps
    from .shapes import REFERENCE_DTYPES, resolve_call

    fa = mixer.maps["fa"]
    names = [o for o in mixer.uses("fa")]
    # the direction in which each operand strengthens the decay (fa decreasing)
    at0 = {y: 0 for y in fa.free_symbols}
    sign = {}
    for o in names:
        try:
            slope = float(sympy.diff(fa, o).subs(at0).evalf())
        except (TypeError, ValueError):
            slope = -1.0
        sign[o.name] = -1.0 if slope > 0 else 1.0

    def shifted(c):
        return {n: (x * 0.5 + sign[n] * c if n in sign else x) for n, x in raw.items()}

    def min_gamma(c):
        x = shifted(c)
        shapes = resolve_call(mixer, x, dtypes=REFERENCE_DTYPES)
        return evaluate_maps(mixer, x, shapes).gamma.min().item()

    # min_gamma decreases with c for a monotone decay; one that is not (-a**2, strongest on both sides)
    # decreases on one side of 0 only: take the first range that brackets the target
    for lo, hi in ((-50.0, 400.0), (0.0, 400.0), (-50.0, 0.0)):
        if min_gamma(hi) <= target <= min_gamma(lo):
            break
    else:  # out of reach: the shift that comes closest
        return shifted(min((-50.0, 0.0, 400.0), key=lambda c: abs(min_gamma(c) - target)))
    for _ in range(40):
        mid = (lo + hi) / 2
        if min_gamma(mid) > target:
            lo = mid
        else:
            hi = mid
    return shifted((lo + hi) / 2)
