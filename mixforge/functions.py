"""Elementwise functions for declarations: `from mixforge.functions import sigmoid, ...`."""
from mixforge.spec.functions import *  # noqa: F401,F403
from mixforge.spec.functions import __all__  # noqa: F401
