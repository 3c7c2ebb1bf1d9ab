"""mixforge: declare a linear-attention mixer, get fast Triton kernels.

    import mixforge as mf
    from mixforge import Mixer, Input, Param
    from mixforge.functions import logsigmoid, silu
"""
from mixforge.spec import (Bonus, CallError, Input, Mixer, Param, SpecError, attention_map, h, load_mixer,
                           reference, s, t, value, zoo)
from mixforge import functions  # noqa: E402
from mixforge.layer import MixerLayer, MixerState  # noqa: E402
from mixforge.plotting import plot_attention_map  # noqa: E402

__version__ = "0.1.0"


def compile(mixer, config_lookup=None):
    """Generate (or reuse from the on-disk cache) and load `mixer`'s kernels: a MixerOps.

    `mixer` is a Mixer or a reference `load_mixer` accepts (zoo name, file.py:NAME, spec.json).
    `config_lookup(mixer, ShapeKey) -> KernelConfig | None` supplies tuned tile configs; by
    default the tuner's: your tuned configs (`mixforge tune`), then the shipped defaults.
    When it answers None, a heuristic config is used.
    """
    from mixforge.codegen.ops import MixerOps

    return MixerOps(mixer, _config_lookup if config_lookup is None else config_lookup)


def tune(mixer, shapes, dtype="bf16", **kwargs):
    """Autotune `mixer`'s kernels for `shapes` ((B, T, H, K, V) or a list) and cache the best configs.

    See `mixforge.tuner.tune` for the options (kernels, trials, storage, timeout, force, grid).
    """
    from mixforge.tuner import tune as _tune

    return _tune(mixer, shapes, dtype, **kwargs)


def _config_lookup(mixer, shape_key):
    """The ConfigLookup the front door hands to compiled ops: tuned cache, shipped defaults, else None."""
    from mixforge.tuner.lookup import config_lookup

    return config_lookup(mixer, shape_key)


__all__ = [
    "Bonus", "CallError", "Input", "Mixer", "Param", "SpecError", "attention_map", "functions", "h",
    "load_mixer", "reference", "s", "t", "value", "zoo",
    "MixerLayer", "MixerState", "plot_attention_map",
    "compile", "tune",
]
