"""The runtime lookup the front door hands to compiled ops: a `codegen.config.ConfigLookup`.

For (mixer, ShapeKey) it answers, in order:

1. the user's tuned config for exactly this key (cache dir, `mixforge tune`),
2. the shipped default for exactly this key (tuner/defaults/*.json),
3. the config of the nearest bucket of T and B*H, the user's or a shipped one,
   the user's on a tie (same GPU, mixer, kernel, dtype, K, V: tile configs do
   not depend on T or B*H for validity, only for speed); among equally near
   buckets the same kernel source, then the same Triton version, then the
   latest tuned (a config tuned on an earlier template version still beats the
   heuristic; it must be valid in today's search space to be used). A forward
   borrows only from a shape on the same side of `codegen.config.walks_idle`
   as the call: few long sequences against many (`_same_walk_regime`),
4. None: the ops use `codegen.config.heuristic_config`.
A nearest bucket's forward config takes the two-pass strategy where its fused
forward would leave the GPU idle at this call's B*H and T
(`codegen.config.fit_strategy`): B*H decides the strategy, not just the speed.

Nothing tunes at run time unless asked: with MIXFORGE_AUTOTUNE=1 a miss at
step 1 tunes that one kernel for that shape (MIXFORGE_AUTOTUNE_TRIALS trials,
default 30) and caches the result. Answers are memoized per key; `invalidate()`
(called after every tune in this process) forgets them.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Optional

from mixforge.codegen.config import KernelConfig, ShapeKey, fit_strategy, walks_idle

from .cache import ConfigCache
from .keys import TuneKey, bucket, current_device, dtype_name, make_key, source_hash, triton_version

_local = threading.local()
#: the representative sizes for a lookup whose B and T are unknown (symbolic under torch.compile)
UNKNOWN_T, UNKNOWN_BH = 4096, 64


def _device_index() -> int:
    import torch

    try:
        return torch.cuda.current_device() if torch.cuda.is_initialized() else -1
    except Exception:
        return -1


def defaults_dir() -> Path:
    return Path(__file__).resolve().parent / "defaults"


def shipped_caches() -> list[ConfigCache]:
    try:
        import importlib.resources as res

        folder = Path(str(res.files("mixforge.tuner") / "defaults"))
    except Exception:
        folder = defaults_dir()
    return [ConfigCache(p, readonly=True) for p in sorted(folder.glob("*.json"))]


def autotune_enabled() -> bool:
    return os.environ.get("MIXFORGE_AUTOTUNE", "0") not in ("", "0", "false", "no")


@dataclasses.dataclass(frozen=True)
class Resolution:
    config: Optional[KernelConfig]
    source: str                 # "user" | "shipped" | "user-nearest" | "shipped-nearest" | "autotune" | "heuristic"
    key: Optional[TuneKey]
    entry: Optional[dict] = None


def _distance(want: TuneKey, have: TuneKey) -> tuple:
    """Buckets apart first (T and B*H in powers of 4), then another kernel source, then another Triton.

    The shape comes first because it moves the best tiles most: on the H100 a forward tuned at B*H = 256
    took 1.12 ms at B*H = 64, T = 8192, where the entry tuned at B*H = 64, T = 4096 on the previous
    template took 0.91 (compare-20261122-132240)."""
    lg = lambda n: math.log(n, 4)  # noqa: E731
    return (abs(lg(want.T_bucket) - lg(have.T_bucket)) + abs(lg(want.BH_bucket) - lg(have.BH_bucket)),
            want.source != have.source, want.triton != have.triton)


def _nearest(cache: ConfigCache, key: TuneKey, usable=lambda e: True) -> Optional[tuple[TuneKey, dict]]:
    """The entry at the least _distance; among equally distant ones the latest tuned. Every template edit
    changes the source, so one bucket gathers entries of several earlier sources, none of them today's: the
    latest was tuned on the templates nearest today's. Taking the first stored instead kept the oldest: on the
    H100 linear attention's B = 1 forward ran a config tuned at 0.620 ms where one tuned at 0.554 on a later
    template sat in the same bucket (compare-20261123-040636)."""
    best = None
    for entry in cache.entries().values():
        k = TuneKey.from_dict(entry["key"])
        if k.hard() != key.hard():
            continue
        rank = (_distance(key, k), _recency(entry))
        # usable() builds the search space to check the config: only for an entry that would win
        if (best is None or rank < best[0]) and usable(entry):
            best = (rank, k, entry)
    return (best[1], best[2]) if best else None


def _same_walk_regime(sk: ShapeKey, entry: dict) -> bool:
    """Whether a forward tuned for `entry`'s shape may serve the call `sk`: both leave a fused forward's walks
    idle (few long sequences) or neither does (codegen.config.walks_idle). Where the walks idle, the forward's
    best tiles are the ones that shorten the states walk, not the ones that fill the GPU with sequences: the
    zoo's forwards at B = 1, T = 32768, H = 16, K = V = 128 on the H100 (lookup_regime-20261123-0816-h100.json)
    took 11-29% less time with the heuristic fitted to that shape than with the configs tuned at B = 4,
    T = 4096 (retnet 0.872 against 1.236 ms, rfa 2.599 against 3.327, linear attention 1.093 against 1.264),
    the same within 1.6% for the per-key decays. (griffin's 0.383 against 0.405 there was a config keyed at a K its
    calls never have: tuner.api.call_shape.) Other kernels, and an entry without its tuned shape (its buckets
    stand in for it), are not held to it."""
    if sk.kernel != "chunk_fwd":
        return True
    shape = entry.get("shape")
    if shape and len(shape) == 5:
        B, T, H = shape[0], shape[1], shape[2]
        NH = B * H
    else:
        k = entry.get("key", {})
        NH, T = k.get("BH_bucket", -1), k.get("T_bucket", -1)
    if NH <= 0 or T <= 0:
        return True
    return walks_idle(NH, T, sk.V) == walks_idle(sk.B * sk.H, sk.T, sk.V)


def _recency(entry: dict) -> float:
    """Sorts later-tuned entries first: minus the entry's creation time (an entry without one sorts last)."""
    try:
        return -_dt.datetime.fromisoformat(entry["created"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return math.inf


class TunedLookup:
    """A ConfigLookup over the user's cache and the shipped defaults."""

    def __init__(self, user: Optional[ConfigCache] = None, shipped: Optional[list[ConfigCache]] = None,
                 autotune: Optional[bool] = None):
        self._user = user
        self._user_explicit = user is not None
        self._shipped = shipped
        self._autotune = autotune
        self._memo: dict = {}
        self._lock = threading.Lock()

    @property
    def user(self) -> ConfigCache:
        if self._user is None:
            self._user = ConfigCache()
        return self._user

    @property
    def shipped(self) -> list[ConfigCache]:
        if self._shipped is None:
            self._shipped = shipped_caches()
        return self._shipped

    def invalidate(self) -> None:
        with self._lock:
            self._memo.clear()
            if not self._user_explicit:
                self._user = None  # follow MIXFORGE_CACHE_DIR changes

    def key_for(self, mixer, sk: ShapeKey) -> TuneKey:
        mixer_hash = mixer if isinstance(mixer, str) else mixer.content_hash
        if sk.T < 0 or sk.B < 0:  # unknown sizes: a typical training shape
            B, T = max(1, UNKNOWN_BH // max(sk.H, 1)), UNKNOWN_T
        else:
            B, T = sk.B, sk.T
        return make_key(mixer_hash, sk.kernel, sk.dtype, B, T, sk.H, sk.K, sk.V)

    def resolve(self, mixer, sk: ShapeKey) -> Resolution:
        # memoized per (mixer object, kernel, dtype, K, V, buckets, GPU): no hashing of the mixer on a hit
        # (and the walk regime, which a bucket of B*H can span: _same_walk_regime)
        memo_key = (mixer if isinstance(mixer, str) else id(mixer), sk.kernel, sk.dtype, sk.K, sk.V,
                    bucket(sk.T) if sk.T >= 0 else -1, bucket(sk.B * sk.H) if sk.B >= 0 else -1, _device_index(),
                    sk.T >= 0 and sk.B >= 0 and walks_idle(sk.B * sk.H, sk.T, sk.V))
        hit = self._memo.get(memo_key)
        if hit is not None and hit[0] is mixer:
            return hit[1]
        res = self._resolve(mixer, sk, self.key_for(mixer, sk))
        with self._lock:
            self._memo[memo_key] = (mixer, res)  # keeps the mixer alive, so its id is not reused
        return res

    def _resolve(self, mixer, sk: ShapeKey, key: TuneKey) -> Resolution:
        ok = lambda e: self._usable(mixer, sk, e)  # noqa: E731
        if sk.T < 0 or sk.B < 0:  # sizes unknown (symbolic under torch.compile): the nearest bucket to typical
            return self._nearest_resolution(key, ok)
        near_ok = lambda e: _same_walk_regime(sk, e) and ok(e)  # noqa: E731
        entry = self.user.get(key)
        if entry is not None and ok(entry):
            return Resolution(KernelConfig.from_dict(entry["config"]), "user", key, entry)
        if self._should_autotune(mixer):
            res = self._autotune_one(mixer, sk, key)
            if res is not None:
                return res
        for cache in self.shipped:
            entry = cache.get(key)
            if entry is not None and ok(entry):
                return Resolution(KernelConfig.from_dict(entry["config"]), "shipped", key, entry)
        return self._nearest_resolution(key, near_ok)

    def _nearest_resolution(self, key: TuneKey, ok) -> Resolution:
        """The nearest bucket's config, the user's on a tie with a shipped one; else the heuristic."""
        found = [(_distance(key, n[0]), rank, source, n)
                 for rank, (source, caches) in enumerate((("user-nearest", [self.user]),
                                                         ("shipped-nearest", self.shipped)))
                 for c in caches if (n := _nearest(c, key, ok)) is not None]
        if not found:
            return Resolution(None, "heuristic", key)
        _, _, source, (k, entry) = min(found, key=lambda f: f[:2])
        return Resolution(KernelConfig.from_dict(entry["config"]), source, k, entry)

    def _usable(self, mixer, sk: ShapeKey, entry: dict) -> bool:
        """A cached config must still be one the kernels accept (hand-edited or stale files are skipped)."""
        from .keys import interpret_mode
        from .space import INTERPRETER, H100, Problem, build_space

        try:
            cfg = KernelConfig.from_dict(entry["config"])
            if isinstance(mixer, str) or not hasattr(mixer, "decay_kind"):
                problem = Problem(K=sk.K, V=sk.V, dtype=sk.dtype)
            else:
                problem = Problem.of(mixer, sk.K, sk.V, sk.dtype)
            interp = interpret_mode()
            space = build_space(sk.kernel, problem, limits=INTERPRETER if interp else H100, interpret=interp,
                                axes={})
            return not space.check(cfg, estimate=False)
        except Exception:
            return False

    def _should_autotune(self, mixer) -> bool:
        on = autotune_enabled() if self._autotune is None else self._autotune
        return on and not getattr(_local, "tuning", False) and hasattr(mixer, "content_hash") \
            and not isinstance(mixer, str)

    def _autotune_one(self, mixer, sk: ShapeKey, key: TuneKey) -> Optional[Resolution]:
        from .api import tune

        try:
            trials = int(os.environ.get("MIXFORGE_AUTOTUNE_TRIALS", "30"))
            tune(mixer, shapes=[(sk.B, sk.T, sk.H, sk.K, sk.V)], dtype=sk.dtype, kernels=[sk.kernel],
                 trials=trials, cache=self.user)
        except Exception as e:  # autotuning is an optimization: never fatal
            warnings.warn(f"mixforge: autotuning {sk.kernel} failed ({type(e).__name__}: {e}); using defaults",
                          RuntimeWarning, stacklevel=4)
            return None
        entry = self.user.get(key)
        if entry is None:
            return None
        return Resolution(KernelConfig.from_dict(entry["config"]), "autotune", key, entry)

    def __call__(self, mixer, sk: ShapeKey) -> Optional[KernelConfig]:
        res = self.resolve(mixer, sk)
        if res.config is not None and res.source.endswith("-nearest") and sk.B >= 0 and sk.T >= 0:
            # tuned for another number of sequences: the forward's strategy follows this call's
            return fit_strategy(res.config, sk.kernel, sk.B * sk.H, sk.T, sk.V)
        return res.config


class tuning_guard:
    """While tuning, lookups never start another tune (the tuner's own forward calls look configs up)."""

    def __enter__(self):
        self._old = getattr(_local, "tuning", False)
        _local.tuning = True

    def __exit__(self, *exc):
        _local.tuning = self._old


_default: Optional[TunedLookup] = None


def default_lookup() -> TunedLookup:
    """The process-wide lookup the front door hands to `compile`."""
    global _default
    if _default is None:
        _default = TunedLookup()
    return _default


def config_lookup(mixer, sk: ShapeKey) -> Optional[KernelConfig]:
    """The ConfigLookup the front door hands to compiled ops, backed by `default_lookup()`.

    B = T = -1 (what a call traced by torch.compile asks with, see MixerOps.config)
    takes the nearest tuned bucket to T=4096, B*H=64.
    """
    return default_lookup()(mixer, sk)


def explain(mixer, kernel: str, B: int, T: int, H: int, K: int, V: int, dtype="bf16") -> Resolution:
    """Where the config for this call would come from (for `mixforge cache` and debugging)."""
    return default_lookup().resolve(mixer, ShapeKey(kernel, dtype_name(dtype), B, T, H, K, V))


__all__ = ["TunedLookup", "Resolution", "default_lookup", "config_lookup", "explain", "tuning_guard",
           "autotune_enabled", "shipped_caches", "current_device", "source_hash", "triton_version"]
