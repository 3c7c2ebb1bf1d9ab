"""`mixforge tune` and `mixforge cache`: the tuner's commands (discovered by mixforge/cli.py)."""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def register(subparsers) -> None:
    t = subparsers.add_parser("tune", help="autotune a mixer's kernels for a shape (Optuna), cache the best configs",
                              description="Tune the tile configs of a mixer's kernels for one or more shapes. "
                                          "Results go into the config cache; a repeated identical tune is a cache hit.")
    t.add_argument("spec", help="a zoo name, file.py:NAME or spec.json")
    t.add_argument("--shape", action="append", required=True, metavar="B,T,H,K,V",
                   help="batch, tokens, heads, key dim, value dim (repeat for several shapes)")
    t.add_argument("--dtype", default="bf16", type=_dtype,
                   help="fp32, fp16, bf16 (or float32, float16, bfloat16); default bf16")
    t.add_argument("--trials", type=int, default=None,
                   help="evaluated trials per kernel, the study's total (default 50)")
    t.add_argument("--kernels", default=None,
                   help="comma-separated: chunk_fwd, chunk_bwd, recurrent_fwd, recurrent_bwd, step "
                        "(default chunk_fwd,chunk_bwd)")
    t.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage: sqlite:///FILE, postgresql://..., mysql://..., journal:FILE "
                        "(default: SQLite under the cache dir). Workers sharing a URL fill one study.")
    t.add_argument("--timeout", type=float, default=None, metavar="S", help="seconds for the whole tune")
    t.add_argument("--trial-timeout", type=float, default=300.0, metavar="S", help="seconds per trial (default 300)")
    t.add_argument("--seed", type=int, default=0, help="sampler seed (give each worker of a shared study its own)")
    t.add_argument("--axis", action="append", default=[], metavar="NAME=V1,V2",
                   help="restrict or extend one axis of the search space, e.g. num_stages=1,2 (repeatable)")
    t.add_argument("--grid", action="store_true", help="run the whole pruned grid instead of TPE")
    t.add_argument("--force", action="store_true", help="tune even when the cache has an entry")
    t.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="processes compiling candidate configs in parallel before they are timed (default: "
                        "the CPU cores on a CUDA machine; 0: compile inside each trial; no effect on CPU)")
    t.add_argument("--batch", type=int, default=None, metavar="N",
                   help="trials asked and compiled together (default: --jobs; the grid compiles all first)")
    t.add_argument("--report-json", default=None, metavar="FILE",
                   help="also write the results (configs, times, compile and timing wall times) to FILE")
    t.set_defaults(func=cmd_tune)

    c = subparsers.add_parser("cache", help="inspect, export, import or clear the tuned-config cache")
    cs = c.add_subparsers(dest="cache_command", required=True)
    cs.add_parser("path", help="print the cache file's path").set_defaults(func=cmd_cache_path)
    ls = cs.add_parser("list", help="list the tuned configs")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.add_argument("--shipped", action="store_true", help="list the shipped defaults instead")
    ls.set_defaults(func=cmd_cache_list)
    sh = cs.add_parser("show", help="print one entry (full key, or a unique prefix or part of it)")
    sh.add_argument("key")
    sh.set_defaults(func=cmd_cache_show)
    ex = cs.add_parser("export", help="write the cache to FILE")
    ex.add_argument("file")
    ex.set_defaults(func=cmd_cache_export)
    im = cs.add_parser("import", help="merge FILE into the cache (validated; foreign or corrupt files rejected)")
    im.add_argument("file")
    im.set_defaults(func=cmd_cache_import)
    cl = cs.add_parser("clear", help="delete the tuned configs")
    cl.add_argument("--studies", action="store_true", help="also delete the default Optuna study database")
    cl.set_defaults(func=cmd_cache_clear)


def _dtype(text: str) -> str:
    from mixforge.tuner.keys import dtype_name

    try:
        return dtype_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_axes(items) -> dict:
    """{"num_stages": (1, 2), "strategy": ("fused",)} from ["num_stages=1,2", "strategy=fused"]."""
    from mixforge.tuner.space import AXES

    out = {}
    for item in items or []:
        name, sep, values = item.partition("=")
        name = name.strip()
        if not sep or name not in AXES or not values.strip():
            raise ValueError(f"--axis {item!r}: expected NAME=V1,V2 with NAME one of {', '.join(AXES)}")
        vals = []
        for v in values.split(","):
            v = v.strip()
            vals.append(None if v.lower() == "none" else int(v) if v.lstrip("-").isdigit() else v)
        out[name] = tuple(vals)
    return out


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False, width=160 if not sys.stdout.isatty() else None)


def config_text(cfg) -> str:
    if cfg is None:
        return "-"
    parts = [f"C{cfg.chunk}"]
    parts.append(f"c{cfg.sub_chunk}")
    if cfg.BK is not None:
        parts.append(f"BK{cfg.BK}")
    parts += [f"BV{cfg.BV}", f"w{cfg.num_warps}", f"s{cfg.num_stages}", cfg.strategy]
    return " ".join(parts)


# --------------------------------------------------------------------------- tune

def cmd_tune(args) -> int:
    from mixforge.spec import load_mixer
    from mixforge.tuner import api
    from mixforge.tuner.runner import Shape
    from mixforge.tuner.study import TunerAbort

    mixer = load_mixer(args.spec)
    try:
        shapes = [Shape.parse(s) for s in args.shape]
    except ValueError as e:
        print(f"mixforge: error: --shape {e}", file=sys.stderr)
        return 2
    kernels = [k.strip() for k in args.kernels.split(",")] if args.kernels else None
    try:
        axes = parse_axes(args.axis)
    except ValueError as e:
        print(f"mixforge: error: {e}", file=sys.stderr)
        return 2
    trials = args.trials if args.trials is not None else api.DEFAULT_TRIALS
    for flag, value in (("--jobs", args.jobs), ("--batch", args.batch)):
        if value is not None and value < (0 if flag == "--jobs" else 1):
            print(f"mixforge: error: {flag} must be >= {0 if flag == '--jobs' else 1}", file=sys.stderr)
            return 2
    console = _console()
    tasks: dict = {}
    compiling: dict = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[best]}"), console=console, transient=False) as progress:
        def on_event(e: dict) -> None:
            kind = e["kind"]
            if kind == "start":
                tasks[e["kernel"]] = progress.add_task(f"{mixer.name} {e['kernel']} {e['shape']}",
                                                       total=e["n_trials"], completed=e.get("done", 0), best="")
            elif kind == "trial" and e["kernel"] in tasks:
                tid = tasks[e["kernel"]]
                progress.advance(tid)
                if e.get("state") == "COMPLETE":
                    best = progress.tasks[tid].fields.get("best_ms")
                    if best is None or e["time_ms"] < best:
                        progress.update(tid, best_ms=e["time_ms"], best=f"best {e['time_ms']:.4g} ms")
            elif kind == "compile":  # a batch (or the whole grid) goes to the compile workers
                cid = compiling.get(e["kernel"])
                if cid is None:
                    compiling[e["kernel"]] = progress.add_task(f"  compiling {e['kernel']}", total=e["n"], best="")
                else:
                    progress.update(cid, total=progress.tasks[cid].total + e["n"])
            elif kind == "compiled_one" and e["kernel"] in compiling:
                progress.advance(compiling[e["kernel"]])
            elif kind == "compiled" and e["kernel"] in compiling:
                cid = compiling[e["kernel"]]  # unjudged configs (time limit) never report one by one
                failed = progress.tasks[cid].fields.get("failed", 0) + e.get("failed", 0)
                progress.update(cid, completed=progress.tasks[cid].total, failed=failed,
                                best=f"{failed} do not compile" if failed else "")
            elif kind == "stop":
                tid = tasks.get(e.get("kernel"))
                if tid is not None and e.get("reason") != "target reached":  # grid done, timeout, exhausted
                    progress.update(tid, total=progress.tasks[tid].completed)

        try:
            report = api.tune(mixer, shapes, args.dtype, kernels=kernels, trials=trials, storage=args.storage,
                              timeout=args.timeout, trial_timeout=args.trial_timeout, seed=args.seed,
                              force=args.force, grid=args.grid, axes=axes or None, callback=on_event,
                              jobs=args.jobs, batch=args.batch)
        except TunerAbort as e:
            progress.stop()
            print(f"mixforge: tuning stopped: {e}", file=sys.stderr)
            return 1
        except ValueError as e:
            progress.stop()
            print(f"mixforge: error: {e}", file=sys.stderr)
            return 2
    table = Table(title=f"{mixer.name} ({mixer.content_hash}), {report.dtype}")
    numeric = ("time ms", "speedup vs default", "trials run", "failed", "rejected", "compile s", "timing s")
    for col in ("kernel", "shape", "best config", "time ms", "speedup vs default", "trials run", "failed",
                "rejected", "compile s", "timing s", "note"):
        table.add_column(col, justify="right" if col in numeric else "left")
    for r in report:
        sp = f"{r.speedup:.2f}x" if r.speedup else "-"
        note = "cache hit" if r.cache_hit else (r.stop_reason or "")
        if not r.cache_hit and r.study_trials != r.trials_run:
            note += f"; study holds {r.study_trials}"
        if r.jobs:
            note += f"; {r.jobs} compile jobs"
        if r.cold_compiles:  # the timing loop compiled kernels itself: inline compiles (or a precompile miss)
            note += f"; {r.cold_compiles} kernels compiled while timing"
        # compile s: the parallel precompile's wall time; timing s: the serial trials' (inline compiles included)
        table.add_row(r.kernel, str(r.shape), config_text(r.config), f"{r.time_ms:.4g}" if r.time_ms else "-", sp,
                      str(r.trials_run), str(r.trials_failed), str(r.trials_rejected),
                      f"{r.compile_wall_s:.1f}" if r.jobs else "-",
                      f"{r.timing_wall_s:.1f}" if not r.cache_hit else "-", note)
    console.print(table)
    if args.report_json:
        _write_report_json(args.report_json, mixer, report)
    if report.cache_hit:
        console.print("cache hit: every kernel already tuned for this key; 0 trials run (use --force to retune)")
    else:
        console.print(f"{report.trials_run} trials run; configs cached in {_cache().path}")
    missing = [r.kernel for r in report if r.config is None]
    if missing:
        console.print(f"no working config found for {', '.join(missing)}: every trial failed or was rejected")
        return 1
    return 0


def _write_report_json(path: str, mixer, report) -> None:
    rows = []
    for r in report:
        rows.append({"kernel": r.kernel, "shape": list(r.shape.astuple()), "key": str(r.key),
                     "cache_hit": r.cache_hit, "config": r.config.to_dict() if r.config else None,
                     "time_ms": r.time_ms, "baseline_ms": r.baseline_ms, "speedup": r.speedup,
                     "grid_size": r.grid_size, "trials_run": r.trials_run, "trials_failed": r.trials_failed,
                     "trials_rejected": r.trials_rejected, "study_trials": r.study_trials, "study": r.study_name,
                     "stop_reason": r.stop_reason, "wall_s": r.wall_s, "jobs": r.jobs,
                     "compile_wall_s": r.compile_wall_s, "timing_wall_s": r.timing_wall_s,
                     "cold_compiles": r.cold_compiles,
                     "compiled": r.report.compiled if r.report else 0,
                     "compile_failed": r.report.compile_failed if r.report else 0,
                     "compile_unknown": r.report.compile_unknown if r.report else 0})
    with open(path, "w") as f:
        json.dump({"mixer": mixer.name, "mixer_hash": mixer.content_hash, "dtype": report.dtype, "results": rows},
                  f, indent=1, default=str)


# --------------------------------------------------------------------------- cache

def _cache():
    from mixforge.tuner.cache import ConfigCache

    return ConfigCache()


def _rows(entries: dict) -> list[dict]:
    from mixforge.tuner.keys import DeviceId

    rows = []
    for name, e in sorted(entries.items()):
        k = e["key"]
        rows.append({"key": name, "mixer": e.get("mixer_name") or k["mixer"], "mixer_hash": k["mixer"],
                     "kernel": k["kernel"], "device": f"{k['device']} ({DeviceId(k['device'], k['cc']).arch})", "triton": k["triton"],
                     "dtype": k["dtype"],
                     "bucket": {"K": k["K"], "V": k["V"], "T_bucket": k["T_bucket"], "BH_bucket": k["BH_bucket"]},
                     "config": e["config"], "time": e["time_ms"], "baseline_ms": e.get("baseline_ms"),
                     "trials": e.get("trials", {})})
    return rows


def cmd_cache_path(args) -> int:
    print(_cache().path)
    return 0


def cmd_cache_list(args) -> int:
    from mixforge.codegen.config import KernelConfig
    from mixforge.tuner.lookup import shipped_caches

    entries = {}
    if args.shipped:
        for c in shipped_caches():
            entries.update(c.entries())
    else:
        entries = _cache().entries()
    rows = _rows(entries)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    console = _console()
    if not rows:
        console.print(f"no tuned configs in {_cache().path if not args.shipped else 'the shipped defaults'}")
        return 0
    table = Table(title=f"{len(rows)} tuned configs")
    for col in ("mixer", "kernel", "device", "dtype", "bucket", "config", "time ms", "key"):
        table.add_column(col)
    for r in rows:
        b = r["bucket"]
        table.add_row(r["mixer"], r["kernel"], r["device"], r["dtype"],
                      f"K{b['K']} V{b['V']} T<={b['T_bucket']} BH<={b['BH_bucket']}",
                      config_text(KernelConfig.from_dict(r["config"])), f"{r['time']:.4g}", r["key"])
    console.print(table)
    return 0


def cmd_cache_show(args) -> int:
    from mixforge.tuner.cache import find

    entries = _cache().entries()
    names = find(entries, args.key)
    if not names:
        print(f"mixforge: no cache entry matches {args.key!r} (see `mixforge cache list`)", file=sys.stderr)
        return 1
    if len(names) > 1:
        print(f"mixforge: {len(names)} entries match {args.key!r}; be more specific:", file=sys.stderr)
        for n in names[:20]:
            print(f"  {n}", file=sys.stderr)
        return 1
    print(json.dumps({names[0]: entries[names[0]]}, indent=1))
    return 0


def cmd_cache_export(args) -> int:
    n = _cache().export(args.file)
    print(f"exported {n} entries to {args.file}")
    return 0


def cmd_cache_import(args) -> int:
    from mixforge.tuner.cache import CacheFormatError

    try:
        what = _cache().import_file(args.file)
    except CacheFormatError as e:
        print(f"mixforge: import rejected: {e}", file=sys.stderr)
        return 1
    counts = {s: sum(v == s for v in what.values()) for s in ("added", "replaced", "unchanged")}
    print(f"imported {len(what)} entries from {args.file}: "
          f"{counts['added']} added, {counts['replaced']} replaced, {counts['unchanged']} unchanged")
    return 0


def cmd_cache_clear(args) -> int:
    from mixforge.tuner.keys import tuner_dir

    n = _cache().clear()
    print(f"removed {n} tuned configs from {_cache().path}")
    if args.studies:
        db = tuner_dir() / "studies.sqlite3"
        if db.exists():
            db.unlink()
            print(f"removed the study database {db}")
    return 0
