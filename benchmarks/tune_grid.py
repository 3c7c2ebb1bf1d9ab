"""How well does the tuner tune? The exhaustive pruned grid against an Optuna run, on the GPU.

    python -m benchmarks.tune_grid --out DIR [--mixers gla,mamba2] [--kernels chunk_fwd,chunk_bwd]
    python -m benchmarks.tune_grid --out DIR --workers 2 --storage journal:DIR/shared.journal
    python -m benchmarks.tune_grid --out DIR --smoke            # CPU, interpreter, tiny shapes: the mechanics

For each mixer (GLA, Mamba-2) and kernel, at B=4, T=4096, H=16, K=V=128, bf16:

1. grid: every config of the pruned space, compiled first in --jobs parallel
   processes (default: every CPU core on a CUDA machine; tuner/precompile.py),
   then timed one by one with do_bench (median), each a Triton cache hit, and
   checked against the trusted output; a config that does not compile is a
   failed trial and is never timed. Kept in DIR/grid.sqlite3: a run cut short
   (--time-limit, Ctrl-C, the 10-minute command limit) resumes where it stopped.
   Under --time-limit the grid is compiled and timed in batches of --jobs
   configs (--batch), so what a command compiles it also times: TRITON_CACHE_DIR
   dies with the GPU machine, DIR/grid.sqlite3 travels. The JSON reports the compile
   wall time and the timing wall time apart, and how many kernels the timing
   loop still had to compile itself (0 when the precompile covered everything).
2. optuna: `mixforge tune --jobs N` in a fresh process, as a user runs it, with
   --trials (default: 25% of the grid), asking --jobs trials at a time and
   compiling them together; its wall time (--cold: with an empty Triton cache,
   so every trial compiles; default: the cache the grid filled); then the
   identical command again, which must be a cache hit with zero trials.
3. report: DIR/tune_grid.json (device, versions, date, every grid result,
   the Optuna trial history, trials needed to come within 3% of the grid
   optimum, tuned and default times) and DIR/tune_grid.png (Optuna's
   best-so-far against trials, next to the grid optimum). --replays N adds N
   seeded TPE replays over the grid's measured table (no GPU needed: run it
   later with --report-only on any machine).

--workers 2 --storage URL: two `mixforge tune` processes (CUDA_VISIBLE_DEVICES=0
and 1) fill one study, against one process alone; reports wall times, trials
per worker and that no config ran twice.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

FULL_SHAPE = (4, 4096, 16, 128, 128)
SMOKE_SHAPE = (1, 16, 1, 16, 16)
SMOKE_AXES = {"chunk": (8, 16), "sub_chunk": (8,), "BV": (16,), "num_warps": (4,), "num_stages": (1,),
              "strategy": ("fused", "two_pass")}
WITHIN = 1.03
TARGET_FRACTION = 0.25


def log(msg: str) -> None:
    print(f"[tune_grid {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- setup

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune_grid", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="work and result folder (studies, caches, JSON, PNG)")
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes and space: the mechanics only")
    p.add_argument("--mixers", default="gla,mamba2")
    p.add_argument("--kernels", default="chunk_fwd,chunk_bwd")
    p.add_argument("--shape", default=None, help="B,T,H,K,V (default 4,4096,16,128,128)")
    p.add_argument("--dtype", default=None, help="default bf16 (smoke: fp32)")
    p.add_argument("--axis", action="append", default=[], metavar="NAME=V1,V2", help="override an axis' values")
    p.add_argument("--jobs", "--compile-workers", dest="jobs", type=int, default=None,
                   help="processes that compile configs in parallel before they are timed (default: the CPU "
                        "cores on a CUDA machine, 0 with --smoke or without CUDA: compile inside each trial)")
    p.add_argument("--batch", type=int, default=None,
                   help="grid configs compiled together, then timed (default: the whole grid; with --time-limit "
                        "--jobs, so a command cut short keeps what it compiled timed)")
    p.add_argument("--trials", type=int, default=None, help="Optuna trials (default: 25%% of the grid)")
    p.add_argument("--trial-timeout", type=float, default=300.0)
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop starting new work after this many seconds (results so far are written)")
    p.add_argument("--replays", type=int, default=0, help="seeded TPE replays over the grid table (CPU only)")
    p.add_argument("--report-only", action="store_true", help="only (re)write the JSON/PNG from DIR")
    p.add_argument("--skip-optuna", action="store_true", help="grid only")
    p.add_argument("--cold", action="store_true",
                   help="run the Optuna phase with an empty Triton cache (every trial compiles: the wall time a "
                        "user sees on a fresh machine; slow). Default: the cache the grid filled")
    p.add_argument("--workers", type=int, default=0, help="two-worker mode: processes sharing one study")
    p.add_argument("--storage", default=None, help="two-worker mode: the shared storage URL (journal:FILE, ...)")
    p.add_argument("--worker-trials", type=int, default=None, help="two-worker mode: study size (default 40)")
    p.add_argument("--dry-run", action="store_true", help="print the grid sizes and exit")
    return p.parse_args(argv)


class Setup:
    def __init__(self, args):
        if args.smoke:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.smoke = args.smoke
        self.shape = tuple(int(x) for x in args.shape.split(",")) if args.shape else (
            SMOKE_SHAPE if args.smoke else FULL_SHAPE)
        self.dtype = args.dtype or ("fp32" if args.smoke else "bf16")
        from mixforge.cli_tuner import parse_axes

        self.axes = {**(SMOKE_AXES if args.smoke else {}), **parse_axes(args.axis)}
        self.mixers = [m.strip() for m in args.mixers.split(",") if m.strip()]
        self.kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
        self.t0 = time.monotonic()
        self.grid_storage = f"sqlite:///{self.out / 'grid.sqlite3'}"
        self.phases = self.out / "phases"
        self.phases.mkdir(exist_ok=True)
        from mixforge.tuner.precompile import default_jobs

        self.jobs = args.jobs if args.jobs is not None else (0 if args.smoke else default_jobs())

    def grid_batch(self):
        """Configs compiled together before timing: the whole grid (no worker idles at a batch boundary),
        but under a time limit batches of `jobs` (one compile round), so what a command compiles it
        also times: Triton's cache does not outlive the GPU machine, the grid study does."""
        if self.args.batch is not None:
            return self.args.batch
        return None if self.args.time_limit is None else max(1, self.jobs)

    def remaining(self):
        if self.args.time_limit is None:
            return None
        return self.args.time_limit - (time.monotonic() - self.t0)

    def out_of_time(self) -> bool:
        r = self.remaining()
        return r is not None and r <= 0

    def axis_flags(self) -> list[str]:
        flags = []
        for name, vals in self.axes.items():
            flags += ["--axis", f"{name}=" + ",".join("None" if v is None else str(v) for v in vals)]
        return flags

    def save_phase(self, name: str, data: dict) -> None:
        path = self.phases / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)

    def load_phase(self, name: str):
        path = self.phases / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None


def environment() -> dict:
    import optuna
    import torch
    import triton

    from mixforge.tuner.keys import current_device, interpret_mode

    dev = current_device()
    return {"device": dev.name, "cc": dev.cc, "interpreter": interpret_mode(), "torch": torch.__version__,
            "triton": triton.__version__, "optuna": optuna.__version__, "python": sys.version.split()[0],
            "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def space_for(setup: Setup, mixer, kernel):
    from mixforge.tuner.api import kernel_space
    from mixforge.tuner.keys import interpret_mode
    from mixforge.tuner.space import Problem

    _, _, _, K, V = setup.shape
    return kernel_space(kernel, Problem.of(mixer, K, V, setup.dtype), interpret_mode(), setup.axes or None)


# --------------------------------------------------------------------------- phase 1: the grid

def history(study, space) -> list[dict]:
    from optuna.trial import TrialState

    from mixforge.tuner.study import DEFINITIVE_FAILS, error_outliers

    rows = []
    trials = study.get_trials(deepcopy=False)
    outliers = error_outliers(trials)   # complete, but a miscompile by its error: never the optimum
    for t in sorted(trials, key=lambda t: t.number):
        if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and
                                              t.user_attrs.get("reason") in DEFINITIVE_FAILS):
            cfg = space.config(t.params) if all(a in t.params for a in space.axes) else None
            rows.append({"number": t.number, "state": t.state.name, "time_ms": t.value,
                         "reason": "error_outlier" if t.number in outliers else t.user_attrs.get("reason"),
                         "rejected": bool(t.user_attrs.get("rejected")) or t.number in outliers,
                         "rel_err": t.user_attrs.get("rel_err"), "wall_s": t.user_attrs.get("wall_s"),
                         "compile_s": t.user_attrs.get("compile_s"),
                         "cold_compiles": t.user_attrs.get("cold_compiles"),
                         "measured_ms": t.user_attrs.get("time_ms"), "error": t.user_attrs.get("error"),
                         "worker": t.user_attrs.get("worker"), "config": cfg.to_dict() if cfg else None})
    return rows


def run_grid(setup: Setup, mixer, kernel) -> dict:
    from mixforge.tuner.keys import make_key
    from mixforge.tuner.precompile import make_precompiler
    from mixforge.tuner.runner import make_objective
    from mixforge.tuner.study import open_study, optimize, quiet_optuna, evaluate

    space = space_for(setup, mixer, kernel)
    grid = space.grid()
    key = make_key(mixer.content_hash, kernel, setup.dtype, *setup.shape)
    name = key.study_name(space.hash) + "/grid"
    study = open_study(name, setup.grid_storage, seed=0)
    done = {json.dumps(h["config"], sort_keys=True) for h in history(study, space)}
    todo = [c for c in grid if json.dumps(c.to_dict(), sort_keys=True) not in done]
    log(f"{mixer.name} {kernel}: grid of {len(grid)} configs ({len(list(space.candidates())) - len(grid)} pruned), "
        f"{len(grid) - len(todo)} already measured")
    out = {"study": name, "grid_size": len(grid), "candidates": len(list(space.candidates())),
           "space": {a: list(space.choices(a)) for a in space.axes}, "fixed": space.fixed}
    obj = make_objective(mixer, kernel, setup.shape, setup.dtype)
    out["objective"] = obj.describe
    rep = None
    if todo and not setup.out_of_time():
        n = [0, 0]

        def compiled(cfg, res):
            n[1] += 1
            if n[1] % 20 == 0:
                log(f"  compiled {n[1]} configs ({res.status}: {cfg})")

        comp = make_precompiler(mixer, kernel, setup.shape, setup.dtype, jobs=setup.jobs, callback=compiled,
                                max_chunk=max(c.chunk for c in grid))

        def on(e):
            if e["kind"] == "compile":
                log(f"  compiling {e['n']} configs in {setup.jobs} processes")
            elif e["kind"] == "compiled":
                log(f"  compiled {e['n']} configs in {e['wall_s']:.1f} s, {e['failed']} do not compile")
            elif e["kind"] == "trial":
                n[0] += 1
                if n[0] % 10 == 0:
                    log(f"  measured {n[0]}/{len(todo)} (trial {e['number']}: {e['state']}"
                        f"{'' if e.get('time_ms') is None else ' %.4g ms' % e['time_ms']})")
        try:
            with quiet_optuna():
                rep = optimize(study, space, obj, n_trials=len(grid), grid=True, timeout=setup.remaining(),
                               trial_timeout=setup.args.trial_timeout, callback=on, compiler=comp,
                               batch=setup.grid_batch() if comp is not None else None)
        finally:
            if comp is not None:
                comp.close()
        out["stop_reason"] = rep.stop_reason
        out["jobs"] = setup.jobs if comp is not None else 0
    # this command's walls: compiling (parallel, ahead) and timing (serial; inline compiles included)
    out["compile_wall_s"] = rep.compile_wall_s if rep else 0.0
    out["timing_wall_s"] = out["measure_wall_s"] = rep.timing_wall_s if rep else 0.0
    # every config in this process's Triton cache (what the Optuna phase after it may count on)
    out["compiled_whole_grid"] = bool(rep and len(todo) == len(grid)
                                      and rep.compiled + rep.compile_failed >= len(grid))
    if rep is not None:
        out["precompile"] = {"jobs": out["jobs"], "wall_s": rep.compile_wall_s, "compiled": rep.compiled,
                             "failed": rep.compile_failed, "unknown": rep.compile_unknown,
                             "cold_compiles_while_timing": rep.cold_compiles}
    rows = history(study, space)
    out["trials"] = rows
    out["complete"] = sum(r["state"] == "COMPLETE" for r in rows)
    out["done"] = len(rows) >= len(grid)
    reasons = {}
    for r in rows:
        if r["state"] == "FAIL":
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    out["failed"] = reasons
    per = sorted(r["compile_s"] for r in rows if r.get("compile_s"))
    out["median_compile_s"] = per[len(per) // 2] if per else None   # one config in one worker
    best = min((r for r in rows if r["state"] == "COMPLETE" and not r["rejected"]), key=lambda r: r["time_ms"],
               default=None)
    out["optimum"] = best and {"config": best["config"], "time_ms": best["time_ms"]}
    heur = space.heuristic(setup.smoke)
    h = next((r for r in rows if r["config"] == heur.to_dict() and r["state"] == "COMPLETE"), None)
    if h is None and not setup.out_of_time():
        ev = evaluate(obj, heur, setup.args.trial_timeout)
        h = {"time_ms": ev.get("value"), "outside_grid": True, "state": ev["state"].name, "reason": ev.get("reason")}
    out["heuristic"] = {"config": heur.to_dict(), "time_ms": h and h.get("time_ms"), "in_grid": space.contains(heur)}
    if best and h and h.get("time_ms"):
        out["speedup_vs_heuristic"] = h["time_ms"] / best["time_ms"]
    if out["done"]:
        log(f"{mixer.name} {kernel}: optimum {best and best['time_ms']:.4g} ms "
            f"({best and best['config']}), heuristic {h and h.get('time_ms')}, failed {reasons}")
    return out


# --------------------------------------------------------------------------- phase 2: optuna as a user runs it

def tune_cmd(setup: Setup, mixer_name: str, kernel: str, trials: int, storage: str, seed: int = 0,
             force: bool = False, jobs: Optional[int] = None, report_json=None) -> list[str]:
    jobs = setup.jobs if jobs is None else jobs
    cmd = [sys.executable, "-m", "mixforge", "tune", mixer_name, "--shape", ",".join(map(str, setup.shape)),
           "--dtype", setup.dtype, "--kernels", kernel, "--trials", str(trials), "--storage", storage,
           "--seed", str(seed), "--trial-timeout", str(setup.args.trial_timeout), "--jobs", str(jobs),
           *setup.axis_flags()]
    if report_json:
        cmd += ["--report-json", str(report_json)]
    return cmd + (["--force"] if force else [])


def optuna_estimate_s(grid: dict, trials: int, cold: bool, jobs: int) -> float:
    """Seconds a `mixforge tune` of `trials` should take: measurement per trial, plus (cold) compilation,
    `jobs` configs at a time (one batch of `jobs` trials compiles in about one config's time)."""
    walls = sorted(r["wall_s"] for r in grid.get("trials", []) if r.get("wall_s"))
    per = walls[len(walls) // 2] if walls else 5.0
    compile_s = (grid.get("median_compile_s") or 60.0) if cold else 0.0
    return 30.0 + trials * per + compile_s * math.ceil(trials / max(1, jobs))


def run_cmd(cmd, env) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return p.returncode, p.stdout, time.perf_counter() - t0


def tpe_study_rows(storage_url: str, mixer, kernel: str, space) -> tuple[str, list[dict]]:
    import optuna

    from mixforge.tuner.study import open_study, resolve_storage

    storage = resolve_storage(storage_url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)
             if f"/{mixer.content_hash}/{kernel}/" in s.study_name and s.study_name.endswith(f"space-{space.hash}")]
    if not names:
        return "", []
    study = open_study(names[0], storage)
    return names[0], history(study, space)


def run_optuna(setup: Setup, mixer, kernel: str, grid: dict, warm: bool = True):
    """The Optuna phase, or None when the time left cannot fit it (rerun later: it needs one cold run).

    warm: this process compiled the whole grid into TRITON_CACHE_DIR (else, say on a fresh GPU machine
    that resumed a grid, the estimate counts the compiles)."""
    space = space_for(setup, mixer, kernel)
    trials = setup.args.trials or max(2, math.ceil(TARGET_FRACTION * len(space.grid())))
    need = optuna_estimate_s(grid, trials, setup.args.cold or not warm, setup.jobs)
    left = setup.remaining()
    if left is not None and left < need:
        log(f"{mixer.name} {kernel}: the Optuna phase needs ~{need:.0f} s, {left:.0f} s left; rerun to do it")
        return None
    storage = f"sqlite:///{setup.out / ('tune-%s-%s.sqlite3' % (mixer.name, kernel))}"
    cold = setup.args.cold
    cache_dir = setup.out / f"cache-{mixer.name}-{kernel}"
    triton_cold = setup.out / f"triton-cold-{mixer.name}-{kernel}"
    for d in (cache_dir, triton_cold):
        shutil.rmtree(d, ignore_errors=True)
    Path(storage.split(":///", 1)[1]).unlink(missing_ok=True)
    env = {**os.environ, "MIXFORGE_CACHE_DIR": str(cache_dir), "PYTHONWARNINGS": "ignore"}
    if cold:
        env["TRITON_CACHE_DIR"] = str(triton_cold)
    report_json = setup.out / f"tune-{mixer.name}-{kernel}.json"
    report_json.unlink(missing_ok=True)
    cmd = tune_cmd(setup, mixer.name, kernel, trials, storage, report_json=report_json)
    if left is not None:  # a safety net only: the estimate above said it fits
        cmd += ["--timeout", f"{max(60.0, left - 30):.0f}"]
    log(f"{mixer.name} {kernel}: {' '.join(cmd[1:])}  ({'cold' if cold else 'warm'} Triton cache)")
    rc, text, wall = run_cmd(cmd, env)
    log(f"  first tune: exit {rc}, {wall:.1f} s")
    shutil.rmtree(triton_cold, ignore_errors=True)  # compiled kernels: large, and only for this run
    first = json.loads(report_json.read_text())["results"][0] if report_json.exists() else {}
    log(f"  compile {first.get('compile_wall_s', 0):.1f} s ({first.get('jobs', 0)} jobs), "
        f"timing {first.get('timing_wall_s', 0):.1f} s, kernels compiled while timing: {first.get('cold_compiles')}")
    name, rows = tpe_study_rows(storage, mixer, kernel, space)
    rc2, text2, wall2 = run_cmd(cmd, env)
    _, rows2 = tpe_study_rows(storage, mixer, kernel, space)
    hit = rc2 == 0 and "cache hit" in text2 and len(rows2) == len(rows)
    log(f"  second tune: exit {rc2}, {wall2:.1f} s, cache hit: {hit}, new trials: {len(rows2) - len(rows)}")
    out = {"command": " ".join(cmd[1:]), "trials_requested": trials, "exit": rc, "wall_s": wall,
           "jobs": first.get("jobs"), "compile_wall_s": first.get("compile_wall_s"),
           "timing_wall_s": first.get("timing_wall_s"), "cold_compiles": first.get("cold_compiles"),
           "cold_triton_cache": cold, "study": name, "history": rows, "output_tail": text[-3000:],
           "second_run": {"exit": rc2, "wall_s": wall2, "cache_hit": hit, "new_trials": len(rows2) - len(rows),
                          "output_tail": text2[-1500:]}}
    out.update(compare_to_grid(rows, grid))
    return out


def best_so_far(rows: list[dict]) -> list:
    best, seq = None, []
    for r in rows:
        if r["state"] == "COMPLETE" and not r["rejected"] and (best is None or r["time_ms"] < best):
            best = r["time_ms"]
        seq.append(best)
    return seq


def compare_to_grid(rows: list[dict], grid: dict) -> dict:
    """Trials needed to come within 3% of the grid optimum: by the run's own timings, and by the grid's
    timing of the same configs (free of timing noise)."""
    opt = (grid.get("optimum") or {}).get("time_ms")
    seq = best_so_far(rows)
    grid_times = {json.dumps(r["config"], sort_keys=True): r["time_ms"] for r in grid.get("trials", [])
                  if r["state"] == "COMPLETE" and not r["rejected"]}
    seq_grid, b = [], None
    for r in rows:
        t = grid_times.get(json.dumps(r["config"], sort_keys=True)) if r["state"] == "COMPLETE" \
            and not r["rejected"] else None
        if t is not None and (b is None or t < b):
            b = t
        seq_grid.append(b)
    first = lambda s: next((i + 1 for i, v in enumerate(s) if v is not None and opt and v <= WITHIN * opt), None)  # noqa
    n_grid = grid.get("grid_size") or 0
    k, kg = first(seq), first(seq_grid)
    heur = (grid.get("heuristic") or {}).get("time_ms")
    best = seq[-1] if seq else None
    return {"best_so_far_ms": seq, "best_so_far_grid_ms": seq_grid,
            "best_ms": best, "best_config": next((r["config"] for r in rows if r["state"] == "COMPLETE"
                                                  and not r["rejected"] and r["time_ms"] == best), None),
            "grid_optimum_ms": opt, "best_vs_grid_optimum": (best / opt) if best and opt else None,
            "trials_to_within_3pct": k, "trials_to_within_3pct_grid_timing": kg,
            "fraction_of_grid": (k / n_grid) if k and n_grid else None,
            "target_met": bool(kg and n_grid and kg <= TARGET_FRACTION * n_grid),
            "speedup_vs_heuristic": (heur / best) if heur and best else None,
            "failed": sum(r["state"] == "FAIL" and not r["rejected"] for r in rows),
            "rejected": sum(r["rejected"] for r in rows)}


# --------------------------------------------------------------------------- replays over the grid table

def replay(grid: dict, space, seeds: int, n_trials: int) -> dict:
    """Seeded TPE runs over the grid's measured table: how many trials each needs to come within 3%."""
    import optuna

    from mixforge.codegen.config import KernelConfig
    from mixforge.tuner.study import Objective, open_study, optimize, quiet_optuna

    table = {json.dumps(r["config"], sort_keys=True): r for r in grid["trials"]}
    opt = grid["optimum"]["time_ms"]

    class Failed(Exception):
        pass

    def run(cfg: KernelConfig, x):
        r = table.get(json.dumps(cfg.to_dict(), sort_keys=True))
        if r is None or (r["state"] == "FAIL" and not r["rejected"]):
            raise Failed((r or {}).get("reason", "not measured"))
        return (0.0 if not r["rejected"] else 1.0), (r["time_ms"] or r.get("measured_ms") or 1.0)

    heur = KernelConfig.from_dict(grid["heuristic"]["config"])
    needed = []
    curves = []
    with quiet_optuna():
        for seed in range(seeds):
            obj = Objective(inputs=None, run=run, trusted=lambda x: 0.0, tolerance=0.5)
            st = open_study(f"replay-{seed}", optuna.storages.InMemoryStorage(), seed=seed)
            optimize(st, space, obj, n_trials=n_trials, baseline=heur, seed=seed)
            rows = [{"state": t.state.name, "time_ms": t.value, "rejected": bool(t.user_attrs.get("rejected"))}
                    for t in sorted(st.trials, key=lambda t: t.number)
                    if t.state.name == "COMPLETE" or t.user_attrs.get("reason")]
            seq = best_so_far(rows)
            curves.append(seq)
            needed.append(next((i + 1 for i, v in enumerate(seq) if v is not None and v <= WITHIN * opt), None))
    ok = sorted(n for n in needed if n is not None)
    return {"seeds": seeds, "n_trials": n_trials, "trials_to_within_3pct": needed,
            "median": ok[len(ok) // 2] if len(ok) == seeds else None,
            "reached": len(ok), "curves": curves}


# --------------------------------------------------------------------------- two workers

def run_workers(setup: Setup) -> dict:
    from mixforge.spec import load_mixer

    mixer = load_mixer(setup.mixers[0])
    kernel = setup.kernels[0]
    space = space_for(setup, mixer, kernel)
    n = setup.args.worker_trials or min(40, len(space.grid()))
    k = setup.args.workers
    shared = setup.args.storage or f"journal:{setup.out / 'shared.journal'}"
    single = f"journal:{setup.out / 'single.journal'}"
    for url in (shared, single):
        if url.startswith("journal:"):
            Path(url[len("journal:"):]).unlink(missing_ok=True)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < gpus < k:
        log(f"warning: {k} workers but {gpus} GPU(s): workers share a GPU and disturb each other's timings")
    results = {}
    for label, url, nproc in (("one_worker", single, 1), (f"{k}_workers", shared, k)):
        triton_dir = setup.out / f"triton-cold-{label}"  # each setup compiles its own trials: a fair race
        shutil.rmtree(triton_dir, ignore_errors=True)
        procs, t0 = [], time.perf_counter()
        for i in range(nproc):
            env = {**os.environ, "MIXFORGE_CACHE_DIR": str(setup.out / f"cache-{label}-{i}"),
                   "TRITON_CACHE_DIR": str(triton_dir), "PYTHONWARNINGS": "ignore"}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
            # the CPU cores are shared: each worker process gets its share of compile jobs
            cmd = tune_cmd(setup, mixer.name, kernel, n, url, seed=i, force=True, jobs=setup.jobs // nproc)
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate()[0] for p in procs]
        wall = time.perf_counter() - t0
        shutil.rmtree(triton_dir, ignore_errors=True)
        _, rows = tpe_study_rows(url, mixer, kernel, space)
        configs = [json.dumps(r["config"], sort_keys=True) for r in rows]
        per_worker = {}
        for r in rows:
            per_worker[r["worker"]] = per_worker.get(r["worker"], 0) + 1
        results[label] = {"storage": url, "processes": nproc, "wall_s": wall, "trials": len(rows),
                          "distinct_configs": len(set(configs)), "no_config_twice": len(configs) == len(set(configs)),
                          "per_worker": per_worker, "exit_codes": [p.returncode for p in procs],
                          "best_ms": min((r["time_ms"] for r in rows if r["state"] == "COMPLETE" and not r["rejected"]),
                                         default=None),
                          "output_tails": [o[-1500:] for o in outs]}
        log(f"{label}: {len(rows)} trials in {wall:.1f} s, per worker {per_worker}, "
            f"no config twice: {results[label]['no_config_twice']}")
    one, many = results["one_worker"]["wall_s"], results[f"{k}_workers"]["wall_s"]
    results["speedup"] = one / many if many else None
    results.update({"mixer": mixer.name, "kernel": kernel, "study_trials": n})
    return results


# --------------------------------------------------------------------------- report

def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r.get("grid", {}).get("optimum")]
    if not rows:
        return
    ncol = min(2, len(rows))
    nrow = -(-len(rows) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.4 * ncol, 4.4 * nrow), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows):
        g = r["grid"]
        opt = g["optimum"]["time_ms"]
        n = g["grid_size"]
        for i, curve in enumerate((r.get("replay") or {}).get("curves", [])):
            ax.plot(range(1, len(curve) + 1), [c if c is not None else float("nan") for c in curve],
                    color="0.8", lw=0.8, drawstyle="steps-post", label="TPE replays over the grid table" if i == 0 else None)
        o = r.get("optuna") or {}
        seq = o.get("best_so_far_ms") or []
        if seq:
            ax.plot(range(1, len(seq) + 1), [c if c is not None else float("nan") for c in seq], "o-", ms=3,
                    color="C0", drawstyle="steps-post", label="Optuna (mixforge tune): best so far")
        ax.axhline(opt, color="C2", lw=1.2, label=f"grid optimum {opt:.4g} ms ({n} configs)")
        ax.axhline(WITHIN * opt, color="C2", lw=0.8, ls="--", label="within 3%")
        ht = (g.get("heuristic") or {}).get("time_ms")
        if ht:
            ax.axhline(ht, color="C3", lw=0.8, ls=":", label=f"heuristic default {ht:.4g} ms")
        ax.axvline(TARGET_FRACTION * n, color="0.5", lw=0.8, ls="-.", label="25% of the grid")
        ax.set_title(f"{r['mixer']} {r['kernel']}")
        ax.set_xlabel("trials")
        ax.set_ylabel("ms (median)")
        ax.legend(fontsize=7)
    env = report["environment"]
    fig.suptitle(f"{env['device']} · torch {env['torch']} · triton {env['triton']} · {report['shape']} "
                 f"{report['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(setup: Setup, env: dict) -> dict:
    results = []
    for m in setup.mixers:
        for k in setup.kernels:
            g = setup.load_phase(f"{m}-{k}-grid")
            if g is None:
                continue
            entry = {"mixer": m, "kernel": k, "grid": g}
            o = setup.load_phase(f"{m}-{k}-optuna")
            if o is not None:
                entry["optuna"] = {**o, **compare_to_grid(o["history"], g)}
            rp = setup.load_phase(f"{m}-{k}-replay")
            if rp is not None:
                entry["replay"] = rp
            results.append(entry)
    report = {"environment": env, "shape": list(setup.shape), "dtype": setup.dtype, "smoke": setup.smoke,
              "axes_override": {k: list(v) for k, v in setup.axes.items()}, "within": WITHIN,
              "target_fraction": TARGET_FRACTION, "results": results}
    w = setup.load_phase("workers")
    if w is not None:
        report["workers"] = w
    path = setup.out / "tune_grid.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    plot(report, setup.out / "tune_grid.png")
    log(f"wrote {path} and {setup.out / 'tune_grid.png'}")
    summary(report)
    return report


def summary(report: dict) -> None:
    for r in report["results"]:
        g, o = r["grid"], r.get("optuna") or {}
        opt = (g.get("optimum") or {}).get("time_ms")
        line = (f"{r['mixer']:8s} {r['kernel']:10s} grid {g['grid_size']} ({'done' if g.get('done') else 'partial'}),"
                f" optimum {opt and round(opt, 4)} ms, default {g.get('heuristic', {}).get('time_ms')} ms,"
                f" grid speedup {g.get('speedup_vs_heuristic') and round(g['speedup_vs_heuristic'], 3)},"
                f" last run: compile {g.get('compile_wall_s') or 0:.0f} s ({g.get('jobs', 0)} jobs),"
                f" timing {g.get('timing_wall_s') or g.get('measure_wall_s') or 0:.0f} s,"
                f" compiled while timing {(g.get('precompile') or {}).get('cold_compiles_while_timing')}")
        if o:
            line += (f" | optuna {len(o.get('history', []))} trials in {o.get('wall_s', 0):.0f} s"
                     f" (compile {o.get('compile_wall_s') or 0:.0f} s, timing {o.get('timing_wall_s') or 0:.0f} s),"
                     f" best "
                     f"{o.get('best_ms') and round(o['best_ms'], 4)} ms (x{o.get('best_vs_grid_optimum') and round(o['best_vs_grid_optimum'], 3)} of optimum),"
                     f" within 3% after {o.get('trials_to_within_3pct')} trials"
                     f" ({o.get('trials_to_within_3pct_grid_timing')} by grid timing), target met: {o.get('target_met')},"
                     f" second run cache hit: {o.get('second_run', {}).get('cache_hit')}")
        if r.get("replay"):
            line += f" | replays: within 3% after {r['replay']['trials_to_within_3pct']}"
        print(line, flush=True)
    w = report.get("workers")
    if w:
        print(f"workers: {json.dumps({k: v for k, v in w.items() if not isinstance(v, dict)})}", flush=True)


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    setup = Setup(args)
    from mixforge.spec import load_mixer

    env = environment()
    log(f"{env['device']} (cc {env['cc']}), torch {env['torch']}, triton {env['triton']}; shape {setup.shape} "
        f"{setup.dtype}; out {setup.out}")
    if args.report_only and setup.load_phase("environment"):
        env = {**setup.load_phase("environment"), "reported_on": env}  # the machine that measured
    elif not args.dry_run and not args.report_only:
        setup.save_phase("environment", env)
    if args.dry_run:
        for m in setup.mixers:
            for k in setup.kernels:
                sp = space_for(setup, load_mixer(m), k)
                print(f"{m} {k}: {len(sp.grid())} valid of {len(list(sp.candidates()))}; axes "
                      f"{ {a: sp.choices(a) for a in sp.axes} }")
        return 0
    if args.workers:
        if not args.report_only:
            setup.save_phase("workers", run_workers(setup))
        write_report(setup, env)
        return 0
    if not args.report_only:
        for m in setup.mixers:
            mixer = load_mixer(m)
            for k in setup.kernels:
                if setup.out_of_time():
                    log("time limit reached; rerun to continue")
                    break
                g = setup.load_phase(f"{m}-{k}-grid")
                warm = False
                if g is None or not g.get("done"):
                    g = run_grid(setup, mixer, k)
                    setup.save_phase(f"{m}-{k}-grid", g)
                    warm = bool(g.get("compiled_whole_grid"))
                if not g.get("done") or args.skip_optuna:
                    continue
                if setup.load_phase(f"{m}-{k}-optuna") is None and not setup.out_of_time():
                    o = run_optuna(setup, mixer, k, g, warm=warm)
                    if o is not None:
                        setup.save_phase(f"{m}-{k}-optuna", o)
    if args.replays:
        for m in setup.mixers:
            for k in setup.kernels:
                g = setup.load_phase(f"{m}-{k}-grid")
                if g and g.get("done") and g.get("optimum"):
                    sp = space_for(setup, load_mixer(m), k)
                    n = min(len(sp.grid()), max(10, math.ceil(0.5 * len(sp.grid()))))
                    log(f"{m} {k}: {args.replays} TPE replays of {n} trials over the grid table")
                    setup.save_phase(f"{m}-{k}-replay", replay(g, sp, args.replays, n))
    write_report(setup, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
