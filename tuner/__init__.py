"""tuner: search space from the plan -> Optuna study (timed, checked) -> JSON config cache -> runtime lookup.

    mf.tune(mixer, shapes=(B, T, H, K, V), dtype="bf16")   # tune, cache the best configs
    mixforge tune gla --shape 4,4096,16,128,128 --dtype bf16

Imports point one way: the tuner imports codegen and spec, never the reverse;
compiled ops receive `lookup.config_lookup` from the front door.
"""
from .api import KernelResult, TuneReport, tune
from .cache import CacheFormatError, CacheWarning, ConfigCache
from .keys import TuneKey, bucket, make_key
from .lookup import TunedLookup, config_lookup, default_lookup, explain
from .space import DEFAULT_KERNELS, KERNELS, SearchSpace, build_space

__all__ = [
    "CacheFormatError", "CacheWarning", "ConfigCache", "DEFAULT_KERNELS", "KERNELS", "KernelResult", "SearchSpace",
    "TuneKey", "TuneReport", "TunedLookup", "build_space", "bucket", "config_lookup", "default_lookup", "explain",
    "make_key", "tune",
]
