"""spec: a declaration (sympy maps + options) -> a validated Mixer; the zoo; the float64 reference."""
from . import functions, zoo
from .errors import CallError, SpecError
from .mixer import Bonus, Mixer, UndecidedDecayWarning, load_mixer
from .reference import attention_map, recurrence, reference
from .shapes import CallShapes, resolve_call
from .symbols import Input, Param, h, s, t, value

__all__ = [
    "Bonus", "CallError", "CallShapes", "Input", "Mixer", "Param", "SpecError", "UndecidedDecayWarning",
    "attention_map", "functions", "h", "load_mixer", "recurrence", "reference", "resolve_call", "s", "t",
    "value", "zoo",
]
