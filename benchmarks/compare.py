"""Generated kernels against the hand-written peers, side by side in one run.

    python -m benchmarks.compare [--quick] [--only gla,mamba2] [--shapes 16,2048,128,128;...] [--out DIR]
    python -m benchmarks.compare --warmup-jobs 8 ...     # first calls (compile, peers' autotuning) in parallel
    python -m benchmarks.compare --configs-from OLD.json ...   # the configs an earlier run's rows used

Each row declares the computation once as a mixforge Mixer and maps the same
random inputs onto the peer's interface (flash-linear-attention, Mamba-2's
SSD, PyTorch SDPA). Before timing, outputs are compared with the peer on the
same inputs; a missing peer is reported as missing, never silently skipped.
Timings are `triton.testing.do_bench` medians. The JSON result holds device,
versions, date, the measured copy and matmul rates, and every row. Every
mixer is also timed against PyTorch's SDPA causal attention at the same shape
(rows with peer "torch.sdpa"; SDPA is measured once per shape).

--warmup-jobs N runs every case's first call (our kernels' compilation, the
peers' compilation and Triton autotuning, which takes FLA minutes per kernel
on a fresh machine) in N parallel processes sharing TRITON_CACHE_DIR before
anything is timed; the timing itself then runs alone, one case after the
other. The peers' autotuning runs its own timing loops while the other
processes compile and time, so on a busy GPU it may pick a slightly
different config than it would alone; their times are then measured here
with whatever config they picked.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import json
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import mixforge as mf
from mixforge import Bonus, Input, Mixer, Param, s, value
from mixforge.functions import exp, logsigmoid
from mixforge.spec.reference import default_scale
from mixforge.spec.testing import random_inputs

# --------------------------------------------------------------------------- the computations

q, k, a = Input("q"), Input("k"), Input("a")
v = Input("v", dim="value")
# The peers compute the core recurrence only (gate and norm are separate kernels in
# FLA), so the rows declare exactly the same computation: no gate, no norm.
LINEAR = Mixer("linear_attention_plain", fq=q, fk=k, fv=v)
SCALAR_DECAY = Mixer("simple_gla", fq=q, fk=k, fv=v, fa=logsigmoid(Input("a", dim=None)))
GLA_CORE = Mixer("gla_core", fq=q, fk=k, fv=v, fa=logsigmoid(a) / 16)
_hg = logsigmoid(a)
HGRN2 = Mixer("hgrn2", fq=q, fk=1 - exp(_hg), fv=v, fa=_hg)
RWKV6_CORE = Mixer("rwkv6_core", fq=Input("r"), fk=k, fv=v, fa=-exp(Input("w")), inclusive=False, scale=1.0,
                   bonus=Bonus(weight=Param("u"), term=s * value))
MAMBA2 = mf.zoo.mamba2
_mg = logsigmoid(a) / 16
METALA_CORE = Mixer("metala_core", fq=q, fk=1 - exp(_mg), fv=v, fa=_mg,
                    bonus=Bonus(weight=Param("u"), term=s * value))


def _peer_inputs_gla(x):
    g = F.logsigmoid(x["a"].float()) / 16
    return dict(q=x["q"], k=x["k"], v=x["v"], g=g.to(x["q"].dtype))


@dataclasses.dataclass
class Case:
    name: str
    mixer: Mixer
    peer: str
    # maps mixforge inputs -> a callable running the peer (returns output [B,T,H,V])
    make_peer: Callable[[dict, dict], Callable[[], torch.Tensor]]
    G: int = 1
    path: str = "chunk"


def _fla(module: str, fn: str):
    mod = importlib.import_module(module)
    return getattr(mod, fn)


def peer_linear(x, opt):
    f = _fla("fla.ops.linear_attn", "chunk_linear_attn")
    return lambda: f(x["q"], x["k"], x["v"], scale=opt["scale"], normalize=False)[0]


def peer_simple_gla(x, opt):
    f = _fla("fla.ops.simple_gla", "chunk_simple_gla")
    g = F.logsigmoid(x["a"].float())
    return lambda: f(x["q"], x["k"], x["v"], g=g, scale=opt["scale"])[0]


def peer_gla(x, opt):
    f = _fla("fla.ops.gla", "chunk_gla")
    p = _peer_inputs_gla(x)
    return lambda: f(p["q"], p["k"], p["v"], p["g"], scale=opt["scale"])[0]


def peer_fused_recurrent_gla(x, opt):
    f = _fla("fla.ops.gla", "fused_recurrent_gla")
    p = _peer_inputs_gla(x)
    return lambda: f(p["q"], p["k"], p["v"], gk=p["g"], scale=opt["scale"])[0]


def peer_hgrn2(x, opt):
    f = _fla("fla.ops.gla", "chunk_gla")
    g = F.logsigmoid(x["a"].float())
    kk = (1 - torch.exp(g)).to(x["q"].dtype)
    return lambda: f(x["q"], kk, x["v"], g.to(x["q"].dtype), scale=opt["scale"])[0]


def peer_rwkv6(x, opt):
    f = _fla("fla.ops.rwkv6", "chunk_rwkv6")
    w = (-torch.exp(x["w"].float())).to(x["r"].dtype)
    return lambda: f(x["r"], x["k"], x["v"], w, x["u"].to(x["r"].dtype), scale=1.0)[0]


def _load_ssd():
    """Mamba-2's SSD from the unpacked sdist in .peers/ (its package __init__ needs CUDA extensions)."""
    root = Path(__file__).resolve().parent.parent / ".peers" / "mamba_ssm"
    if "mamba_ssm" not in sys.modules:
        if not root.is_dir():
            raise ModuleNotFoundError("mamba_ssm sources not found under .peers/")
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = [str(root)]
        sys.modules["mamba_ssm"] = pkg
    return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined


def peer_mamba2(x, opt):
    f = _load_ssd()
    A = -torch.exp(x["A_log"].float())
    return lambda: f(x["x"], x["dt"], A, x["B"], x["C"], chunk_size=256, dt_bias=x["dt_bias"].float(),
                     dt_softplus=True)


def peer_sdpa(x, opt):
    qq = x.get("q", x.get("r", x.get("C")))
    vv = x.get("v", x.get("x"))
    kk = x.get("k", qq)
    Hq, Hv = qq.shape[2], vv.shape[2]
    if Hq != Hv:  # grouped C/B (Mamba-2): attention over the same heads
        qq = qq.repeat_interleave(Hv // Hq, dim=2)
        kk = kk.repeat_interleave(Hv // Hq, dim=2)
    # the transposes inside the call: views taken before the inputs require grad do not carry it back
    return lambda: F.scaled_dot_product_attention(*(t_.transpose(1, 2) for t_ in (qq, kk, vv)),
                                                  is_causal=True).transpose(1, 2)


CASES = [
    Case("linear_attention", LINEAR, "fla.chunk_linear_attn", peer_linear),
    Case("scalar_decay", SCALAR_DECAY, "fla.chunk_simple_gla", peer_simple_gla),
    Case("gla", GLA_CORE, "fla.chunk_gla", peer_gla),
    Case("hgrn2", HGRN2, "fla.chunk_gla", peer_hgrn2),
    Case("rwkv6", RWKV6_CORE, "fla.chunk_rwkv6", peer_rwkv6),
    Case("gla_recurrent", GLA_CORE, "fla.fused_recurrent_gla", peer_fused_recurrent_gla, path="recurrent"),
    Case("mamba2", MAMBA2, "mamba_ssm.ssd", peer_mamba2, G=1),
]


# --------------------------------------------------------------------------- measurement

AGREE_TOL = 2e-2   # bf16 outputs of the same computation: a few 1e-3 expected (ALGORITHMS.md §5)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench(fn, warmup=25, rep=200):
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def peak_mem(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def fwd_bwd(run: Callable[[], torch.Tensor], leaves: list[torch.Tensor], dy: torch.Tensor):
    def step():
        for t_ in leaves:
            t_.grad = None
        y = run()
        y.backward(dy)
    return step


def on_pass(run: Callable[[], torch.Tensor], leaves: list[torch.Tensor], pass_: str, what: Callable):
    """what(step), step being the forward alone (under no_grad) or forward plus backward into every leaf."""
    if pass_ == "fwd":
        with torch.no_grad():
            return what(run)
    for t_ in leaves:
        t_.requires_grad_(True)
    return what(fwd_bwd(run, leaves, torch.randn_like(run())))


def measure(run: Callable[[], torch.Tensor], leaves: list[torch.Tensor], pass_: str) -> tuple[float, int]:
    """(median ms, peak bytes) of one pass."""
    return on_pass(run, leaves, pass_, lambda step: (bench(step), peak_mem(step)))


def kernel_profile(fn: Callable[[], object], iters: int = 5) -> list:
    """[(kernel, device us per call, launches per call)] of fn, largest first: where a row's time goes."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = [(ev.key[:80], round(ev.device_time_total / iters, 1), ev.count / iters)
            for ev in prof.key_averages() if getattr(ev, "device_time_total", 0) > 0]
    return sorted(rows, key=lambda r: -r[1])


def profiled(run: Callable[[], torch.Tensor], leaves: list[torch.Tensor], pass_: str) -> list:
    """kernel_profile of one pass."""
    return on_pass(run, leaves, pass_, kernel_profile)


def machine_rates() -> dict:
    n = 1 << 28  # 512 MiB of bf16 read + written
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    copy = 2 * src.numel() * 2 / (ms * 1e-3)
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms_mm = bench(lambda: m @ m)
    del src, dst
    return {"copy_bytes_per_s": copy, "bf16_matmul_flops": 2 * 8192 ** 3 / (ms_mm * 1e-3)}


def roofline_ms(mixer: Mixer, x: dict, rates: dict) -> float:
    """Bytes of every per-token input read once and o written once, at the copy rate."""
    nbytes = sum(t_.numel() * t_.element_size() for n_, t_ in x.items() if n_ in {o.name for o in mixer.inputs})
    out = next(t_ for n_, t_ in x.items() if n_ in ("v", "x"))
    nbytes += out.numel() * out.element_size()
    return nbytes / rates["copy_bytes_per_s"] * 1e3


#: (case name, kernel, B, T, H, K, V) -> the config a row pins (--configs-from)
PINNED: dict = {}


def load_pins(path: str) -> dict:
    """The configs every row of an earlier compare run used, by (case, kernel, B, T, H, K, V): a later run with
    them times the same kernels, where the cache they came from is gone (a fresh machine) or moved on."""
    pins = {}
    for r in json.loads(Path(path).read_text()).get("rows", []):
        for kernel, used in (r.get("configs") or {}).items():
            if "config" in used:
                pins[(r["mixer"], kernel, r["B"], r["T"], r["H"], r["K"], r["V"])] = used["config"]
    if not pins:
        raise SystemExit(f"--configs-from {path}: no row records a config")
    return pins


def compile_case(case: Case):
    """mf.compile with the default lookup, or the pinned configs (--configs-from) where a row has them."""
    if not PINNED:
        return mf.compile(case.mixer)
    from mixforge.codegen.config import KernelConfig
    from mixforge.tuner.lookup import config_lookup

    def lookup(mixer, sk):
        pin = PINNED.get((case.name, sk.kernel, sk.B, sk.T, sk.H, sk.K, sk.V))
        return KernelConfig.from_dict(pin) if pin else config_lookup(mixer, sk)
    return mf.compile(case.mixer, config_lookup=lookup)


def configs_used(case: Case, ops, x: dict) -> dict:
    """Per kernel of the case's path: the config its calls run with here and where it came from (user,
    shipped, a nearest bucket of either, or the heuristic), so a row can be reproduced. A tuned config also
    brings what the tuner measured for it and at which shape (`tuned_ms`, `tuned_shape`): a row's own time
    far from it is a finding (2026-11-22: linear attention's K = 64 forward, tuned at 0.190 ms, ran 0.440
    in the compare)."""
    from mixforge.spec.shapes import resolve_call
    from mixforge.tuner.lookup import explain

    sh = resolve_call(case.mixer, x)
    out = {}
    for kernel in (f"{case.path}_fwd", f"{case.path}_bwd"):
        try:
            found = explain(case.mixer, kernel, sh.B, sh.T, sh.H, sh.K, sh.V, sh.dtype)
            pinned = (case.name, kernel, sh.B, sh.T, sh.H, sh.K, sh.V) in PINNED
            out[kernel] = dict(source="pinned" if pinned else found.source, config=ops.config(kernel, sh).to_dict())
            if pinned:
                continue
            if found.entry and found.entry.get("time_ms") is not None:
                out[kernel].update(tuned_ms=found.entry["time_ms"], tuned_shape=found.entry.get("shape"))
        except Exception as e:  # a record, never a reason to lose the row
            out[kernel] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
    return out


def run_case(case: Case, ops, B, T, H, K, V, dtype, rates, passes=("fwd", "fwd+bwd"), peers=True,
             profile=False) -> list[dict]:
    x = random_inputs(case.mixer, B=B, T=T, H=H, K=K, V=V, G=case.G, dtype=dtype, device="cuda", seed=0)
    for n_ in ("q", "k", "r", "C", "B"):  # keep logits moderate at K = 128
        if n_ in x and x[n_].dim() == 4:
            x[n_] = (x[n_].float() * 0.5).to(dtype)
    scale = default_scale(case.mixer, K)
    rows = []
    fn_ours = getattr(ops, case.path)

    def ours():
        return fn_ours(**x)[0]

    base = dict(mixer=case.name, peer=case.peer, B=B, T=T, H=H, K=K, V=V,
                dtype=str(dtype).replace("torch.", ""), path=case.path, configs=configs_used(case, ops, x))
    try:
        if not peers:
            raise RuntimeError("not measured (--no-peers)")
        peer = case.make_peer(x, {"scale": scale})
    except Exception as e:  # peer absent or refuses
        peer, peer_err = None, f"{type(e).__name__}: {e}"
    agree = None
    if peer is not None:
        with torch.no_grad():
            try:
                agree = rel_err(ours(), peer())
            except Exception as e:
                peer, peer_err = None, f"{type(e).__name__}: {e}"
    for p in passes:
        row = dict(base, **{"pass": p})
        leaves = [t_ for t_ in x.values()]
        try:
            row["ms"], row["peak_bytes"] = measure(ours, leaves, p)
            if profile:
                row["profile_us"] = profiled(ours, leaves, p)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        if peer is None:
            row["peer_missing"] = peer_err
        else:
            row["agree_rel_err"] = agree
            try:
                row["peer_ms"], row["peer_peak_bytes"] = measure(peer, leaves, p)
                if profile:
                    row["peer_profile_us"] = profiled(peer, leaves, p)
            except Exception as e:
                row["peer_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        for t_ in leaves:
            t_.requires_grad_(False)
            t_.grad = None
        if "ms" in row and "peer_ms" in row:
            row["ratio"] = row["peer_ms"] / row["ms"]
        if p == "fwd":
            row["roofline_ms"] = roofline_ms(case.mixer, x, rates)
            if "ms" in row:
                row["roofline_fraction"] = row["roofline_ms"] / row["ms"]
        if agree is not None:
            row["agrees"] = agree <= AGREE_TOL
        rows.append(row)
    return rows


def sdpa_times(B, T, H, K, V, dtype) -> dict:
    """SDPA causal attention at this shape, fwd and fwd+bwd: {pass: (ms, peak bytes)} (measured once)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = [torch.randn(B, T, H, d, device="cuda", dtype=dtype, generator=g) for d in (K, K, V)]
    x = dict(q=qkv[0], k=qkv[1], v=qkv[2])
    run = peer_sdpa(x, {})
    out = {}
    for p in ("fwd", "fwd+bwd"):
        out[p] = measure(run, list(x.values()), p)
        for t_ in x.values():
            t_.requires_grad_(False)
            t_.grad = None
    return out


def sdpa_rows(ours: list[dict], sdpa: dict) -> list[dict]:
    """Each measured row of ours again, against SDPA's time at the same shape."""
    rows = []
    for r in ours:
        if "ms" not in r or r.get("pass") not in sdpa:
            continue
        ms, peak = sdpa[r["pass"]]
        rows.append({k: r[k] for k in ("mixer", "B", "T", "H", "K", "V", "dtype", "path", "pass", "ms",
                                       "peak_bytes") if k in r}
                    | dict(peer="torch.sdpa", peer_ms=ms, peer_peak_bytes=peak, ratio=ms / r["ms"]))
    return rows


def versions() -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["device"] = f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs)"
    for mod in ("fla", "mamba_ssm"):
        try:
            m = importlib.import_module(mod) if mod != "mamba_ssm" else (_load_ssd() and sys.modules["mamba_ssm"])
            info[mod] = getattr(m, "__version__", "present")
        except Exception as e:
            info[mod] = f"missing ({type(e).__name__})"
    return info


SHAPES = [(16, 2048, 128, 128), (4, 8192, 128, 128), (1, 32768, 128, 128), (8, 4096, 64, 64), (8, 4096, 256, 256)]


def _parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    try:
        shapes = [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(sh) != 4 or min(sh) < 1 for sh in shapes):
        raise SystemExit(f"--shapes: expected B,T,K,V[;B,T,K,V...] with positive integers, got {text!r}")
    return shapes


def _cases(only: set) -> list[Case]:
    unknown = only - {c.name for c in CASES}
    if unknown:
        raise SystemExit(f"--only: unknown case(s) {sorted(unknown)}; choose from {', '.join(c.name for c in CASES)}")
    return [c for c in CASES if not only or c.name in only]


def _shapes_of(case: Case, shapes):
    return [sh for sh in shapes if not (case.path == "recurrent" and sh[1] > 2048)]


def warm_one(case: Case, shapes, peers: bool, ours: bool = True) -> None:
    """One case's first calls at every shape (compilation, autotuning), nothing timed."""
    ops = compile_case(case) if ours else None
    for (B, T, K, V) in _shapes_of(case, shapes):
        x = random_inputs(case.mixer, B=B, T=T, H=16, K=K, V=V, G=case.G, dtype=torch.bfloat16, device="cuda",
                          seed=0)
        runs = [lambda: getattr(ops, case.path)(**x)[0]] if ours else []
        if peers:
            try:
                runs.append(case.make_peer(x, {"scale": default_scale(case.mixer, K)}))
            except Exception as e:
                print(f"[warm {case.name}] peer: {type(e).__name__}: {e}", flush=True)
        for run in runs:
            try:
                for t_ in x.values():
                    t_.requires_grad_(True)
                run().float().sum().backward()
            except Exception as e:
                print(f"[warm {case.name}] {type(e).__name__}: {str(e)[:200]}", flush=True)
            for t_ in x.values():
                t_.grad = None
        torch.cuda.synchronize()


def tune_cases(cases, shapes, trials: int, time_limit, passes=("fwd", "bwd")) -> list[dict]:
    """mf.tune for every case at every listed shape, the kernels of its path for `passes` (fwd, bwd).

    Every shape, not one per K: a config tuned at B = 16, T = 2048 and looked up at B = 1, T = 32768 (the
    nearest bucket) took 0.91 ms for linear attention's forward against the heuristic's 0.61
    (compare-20261122-132240). The later shapes of one K mostly reuse compiled kernels (T and B are
    runtime arguments), so they cost little more than their timing.

    A time limit is shared evenly: each (case, shape) may use the time left over the items left, so that
    the first cases cannot spend it all (one limit for all, in order, left mamba2 untuned at K = 256 and
    rwkv6's backward at 0 trials: compare-tune-20261122-1500-h100-k256.log); what one leaves over goes on."""
    t0 = time.time()
    done = []
    todo = [(case, shape) for case in cases for shape in _shapes_of(case, shapes)]
    for i, (case, (B, T, K, V)) in enumerate(todo):
        left = None if time_limit is None else time_limit - (time.time() - t0)
        if left is not None and left <= 5:
            done.append(dict(mixer=case.name, K=K, V=V, skipped="time limit"))
            continue
        share = None if left is None else left / (len(todo) - i)
        t1 = time.time()
        try:
            report = mf.tune(case.mixer, (B, T, 16, K, V), "bf16", trials=trials, timeout=share,
                             kernels=[f"{case.path}_{p}" for p in passes])
            rows = [dict(kernel=r.kernel, time_ms=r.time_ms, speedup=r.speedup, trials=r.trials_run,
                         cache_hit=r.cache_hit, config=r.config.to_dict() if r.config else None)
                    for r in report]
        except Exception as e:
            rows = [dict(error=f"{type(e).__name__}: {str(e)[:300]}")]
        done.append(dict(mixer=case.name, B=B, T=T, K=K, V=V, wall_s=time.time() - t1, kernels=rows))
        print(f"[tune {case.name}] B={B} T={T} K={K}: {json.dumps(rows, default=str)[:400]}", flush=True)
    return done


def warm_all(cases, shapes, jobs: int, peers: bool, ours: bool = True, configs_from=None) -> float:
    """Every case's first calls in up to `jobs` parallel processes, one per case and K (the peers
    autotune per K); returns the wall time."""
    import subprocess

    t0 = time.time()
    todo = []
    for c in cases:
        for K in dict.fromkeys(sh[2] for sh in _shapes_of(c, shapes)):
            spec = ";".join(",".join(map(str, sh)) for sh in _shapes_of(c, shapes) if sh[2] == K)
            todo.append((f"{c.name} K={K}", c.name, spec))
    running = []
    while todo or running:
        while todo and len(running) < jobs:
            label, name, spec = todo.pop(0)
            cmd = [sys.executable, "-m", "benchmarks.compare", "--warm-one", name, "--shapes", spec]
            if not peers:
                cmd.append("--no-peers")
            if not ours:
                cmd.append("--peers-only")
            if configs_from:
                cmd += ["--configs-from", *configs_from]
            running.append((label, time.time(), subprocess.Popen(cmd)))
        time.sleep(0.5)
        for item in list(running):
            name, started, proc = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"[warm] {name}: exit {proc.returncode} after {time.time() - started:.0f}s", flush=True)
    return time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--quick", action="store_true", help="the first shape only (B=16, T=2048, K=V=128)")
    ap.add_argument("--shapes", default=None, help="B,T,K,V;B,T,K,V... (H = 16, bf16); default: all five")
    ap.add_argument("--peers-only", action="store_true", help="time the peers without mixforge kernels")
    ap.add_argument("--no-peers", action="store_true", help="time mixforge's kernels only (no peer autotuning)")
    ap.add_argument("--no-sdpa", action="store_true", help="leave out the SDPA rows")
    ap.add_argument("--warmup-jobs", type=int, default=0,
                    help="first calls of every case in this many parallel processes before timing")
    ap.add_argument("--tune-trials", type=int, default=0,
                    help="tune every case first at every shape (mf.tune, this many trials per kernel); "
                         "cached in MIXFORGE_CACHE_DIR, so a later run with the same cache times the tuned "
                         "kernels without tuning again")
    ap.add_argument("--tune-only", action="store_true", help="tune (--tune-trials) and exit")
    ap.add_argument("--tune-time-limit", type=float, default=None, help="seconds for all the tuning")
    ap.add_argument("--tune-passes", default="fwd,bwd",
                    help="whose kernels to tune: fwd, bwd or both (an untuned one keeps its cached or heuristic "
                         "config)")
    ap.add_argument("--warmup-only", action="store_true", help="run the warm-up (--warmup-jobs) and exit")
    ap.add_argument("--profile", action="store_true",
                    help="also record each row's kernels and their device time (torch.profiler), ours and the peer's")
    ap.add_argument("--configs-from", nargs="+", default=None, metavar="JSON",
                    help="run every row with the configs earlier compares' rows at that shape used (their "
                         "'configs'; a later file's win); shapes they did not run keep the cache's or the "
                         "heuristic's")
    ap.add_argument("--warm-one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for f in args.configs_from or ():
        PINNED.update(load_pins(f))
    if not torch.cuda.is_available():
        print("benchmarks.compare needs a CUDA device", file=sys.stderr)
        return 2
    shapes = _parse_shapes(args.shapes) if args.shapes else (SHAPES[:1] if args.quick else SHAPES)
    cases = _cases(set(filter(None, args.only.split(","))))
    if args.warm_one:
        warm_one(_cases({args.warm_one})[0], shapes, peers=not args.no_peers, ours=not args.peers_only)
        return 0
    info = versions()
    if args.configs_from:
        info["configs_from"] = args.configs_from
    if args.tune_trials > 0:
        passes = tuple(p for p in args.tune_passes.split(",") if p)
        if not passes or set(passes) - {"fwd", "bwd"}:
            ap.error(f"--tune-passes: fwd, bwd or fwd,bwd, got {args.tune_passes!r}")
        info["tuning"] = tune_cases(cases, shapes, args.tune_trials, args.tune_time_limit, passes)
        if args.tune_only:
            print(json.dumps(info["tuning"], indent=1))
            return 0
    if args.warmup_jobs > 0:
        info["warmup_s"] = warm_all(cases, shapes, args.warmup_jobs, peers=not args.no_peers,
                                    ours=not args.peers_only, configs_from=args.configs_from)
        if args.warmup_only:
            print(f"warm-up done in {info['warmup_s']:.0f} s")
            return 0
    rates = machine_rates()
    info["rates"] = rates
    dtype = torch.bfloat16
    H = 16
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out / f"compare-{stamp}.json"
    sdpa: dict = {}

    def save():  # after every case: a run cut short by its time limit keeps what it measured
        path.write_text(json.dumps({**info, "rows": rows}, indent=1))
    for case in cases:
        ops = None
        if not args.peers_only:
            try:
                ops = compile_case(case)
            except Exception as e:
                print(f"[{case.name}] compile failed: {e}")
        for (B, T, K, V) in _shapes_of(case, shapes):
            t0 = time.time()
            try:
                if ops is None:
                    rows += _peer_only(case, B, T, H, K, V, dtype)
                else:
                    ours = run_case(case, ops, B, T, H, K, V, dtype, rates, peers=not args.no_peers,
                                    profile=args.profile)
                    rows += ours
                    if not args.no_sdpa:
                        if (B, T, K, V) not in sdpa:
                            sdpa[(B, T, K, V)] = sdpa_times(B, T, H, K, V, dtype)
                        rows += sdpa_rows(ours, sdpa[(B, T, K, V)])
            except Exception:
                rows.append(dict(mixer=case.name, B=B, T=T, K=K, V=V, error=traceback.format_exc()[-800:]))
            print(f"[{case.name}] B={B} T={T} K={K} V={V}: {time.time() - t0:.1f}s", flush=True)
            save()
    save()
    print(table(rows))
    print(f"wrote {path}")
    return 0


def _peer_only(case, B, T, H, K, V, dtype):
    x = random_inputs(case.mixer, B=B, T=T, H=H, K=K, V=V, G=case.G, dtype=dtype, device="cuda", seed=0)
    scale = default_scale(case.mixer, K)
    rows = []
    try:
        peer = case.make_peer(x, {"scale": scale})
        for p in ("fwd", "fwd+bwd"):
            ms, peak = measure(peer, list(x.values()), p)
            rows.append(dict(mixer=case.name, peer=case.peer, B=B, T=T, H=H, K=K, V=V, **{"pass": p}, peer_ms=ms,
                             peer_peak_bytes=peak))
    except Exception as e:
        rows.append(dict(mixer=case.name, peer=case.peer, B=B, T=T, K=K, V=V, peer_error=f"{type(e).__name__}: {str(e)[:300]}"))
    return rows


def table(rows) -> str:
    head = "| mixer | peer | B | T | K | pass | ms | peer ms | ratio | agree |\n|---|---|---|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        def f(key, fmt="{:.3f}"):
            return fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else ("err" if key in ("ms", "peer_ms") and (r.get("error") or r.get("peer_error")) else "–")
        lines.append(f"| {r.get('mixer')} | {r.get('peer', '')} | {r.get('B')} | {r.get('T')} | {r.get('K')} | "
                     f"{r.get('pass', '')} | {f('ms')} | {f('peer_ms')} | {f('ratio', '{:.2f}')} | {f('agree_rel_err', '{:.1e}')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
