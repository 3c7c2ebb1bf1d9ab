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

__all__ = [
    "Bonus", "CallError", "Input", "Mixer", "Param", "SpecError", "attention_map", "functions", "h",
    "load_mixer", "reference", "s", "t", "value", "zoo",
    "MixerLayer", "MixerState", "plot_attention_map",
]
