"""Write the shipped defaults (tuner/defaults/<gpu>.json) from tuning runs on that GPU.

    python -m mixforge.tuner.make_defaults --out tuner/defaults/h100.json                 # the zoo, one shape
    python -m mixforge.tuner.make_defaults --out tuner/defaults/h100.json --mixers gla,mamba2 --time-limit 540
    python -m mixforge.tuner.make_defaults --out tuner/defaults/h100.json --merge DIR/cache-*/tuner/configs.json

Entries go straight into --out (the cache format, validated, written
atomically), and a mixer whose entries are there already is a cache hit: a run
cut short resumes where it stopped. The lookup uses an entry for the nearest T
and B*H bucket when no exact one exists, so one representative shape per
mixer already serves every sequence length. Entries are keyed by the GPU they
were measured on; commit the file (package data) to ship them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_SHAPE = "4,4096,16,128,128"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixforge.tuner.make_defaults", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the defaults file to fill (created if missing)")
    p.add_argument("--mixers", default=None, help="comma-separated zoo names, or all (default: all, "
                                                   "none with --merge)")
    p.add_argument("--shapes", default=DEFAULT_SHAPE, help="semicolon-separated B,T,H,K,V")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--kernels", default="chunk_fwd,chunk_bwd")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--storage", default=None, help="Optuna storage (default: SQLite next to --out)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; stop starting new tunes after it")
    p.add_argument("--per-mixer-time", type=float, default=None,
                   help="seconds for each mixer's tune (its kernels share them), so one slow mixer cannot "
                        "take a whole --time-limit")
    p.add_argument("--merge", nargs="*", default=[], help="cache files whose valid entries to copy in")
    args = p.parse_args(argv)

    from mixforge.spec import zoo

    from .api import tune
    from .cache import CacheFormatError, ConfigCache

    out = ConfigCache(Path(args.out))
    for f in args.merge:
        try:
            what = out.import_file(f)
            print(f"merged {len(what)} entries from {f}")
        except CacheFormatError as e:
            print(f"skipped {f}: {e}", file=sys.stderr)
    if args.mixers is None and args.merge:
        return 0
    names = list(zoo.ALL) if args.mixers in (None, "all") else [m.strip() for m in args.mixers.split(",") if m.strip()]
    storage = args.storage or f"sqlite:///{Path(args.out).with_suffix('.studies.sqlite3').resolve()}"
    t0 = time.monotonic()
    for shape in args.shapes.split(";"):
        for dtype in args.dtypes.split(","):
            for name in names:
                left = None if args.time_limit is None else args.time_limit - (time.monotonic() - t0)
                if left is not None and left <= 0:
                    print("time limit reached; run again to continue")
                    return 0
                budget = min((b for b in (left, args.per_mixer_time) if b is not None), default=None)
                report = tune(zoo.ALL[name], shape, dtype, kernels=args.kernels.split(","), trials=args.trials,
                              storage=storage, cache=out, timeout=budget)
                for r in report:
                    sp = f"{r.speedup:.2f}x" if r.speedup else "-"
                    print(f"{name:18s} {r.kernel:10s} {shape} {dtype}: "
                          f"{'cache hit' if r.cache_hit else f'{r.trials_run} trials'}, "
                          f"{r.time_ms and round(r.time_ms, 4)} ms, {sp} vs the heuristic", flush=True)
    print(f"{len(out.entries())} entries in {out.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
