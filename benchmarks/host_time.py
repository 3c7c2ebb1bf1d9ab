"""Where a call's wall time goes when the GPU is not the bottleneck: the host's share, ours and the peer's.

    python -m benchmarks.host_time [--only linear_attention,scalar_decay] [--shapes "8,4096,64,64"] \
        [--pass fwd+bwd] [--calls 30] [--top 25] --out DIR

For every case of benchmarks.compare at every shape and pass, side by side with
its peer on the same inputs:
* wall: the do_bench median of one call, as compare measures it;
* device: the sum of the call's kernel times (torch.profiler);
* host: the time the host takes to issue one call, timed over `--calls` calls
  without a synchronization in between (the launch queue holds them all), so
  a wall time near the host time and well above the device time means the
  GPU waits on Python;
* a cProfile of those calls, the `--top` functions by own time, written next
  to the JSON: which Python the host time is.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import io
import json
import pstats
import time
from pathlib import Path

import torch

from mixforge.spec.reference import default_scale
from mixforge.spec.testing import random_inputs

from . import compare


def host_us(step, calls: int) -> float:
    """Microseconds the host spends issuing one call (the GPU runs behind it)."""
    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / calls * 1e6


def host_profile(step, calls: int, top: int) -> str:
    """cProfile of `calls` calls: the `top` functions by own time, then by cumulative time."""
    step()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        step()
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def measure_side(run, leaves, pass_: str, calls: int, top: int) -> tuple[dict, str]:
    def what(step):
        wall = compare.bench(step)
        device = sum(us * n for _, us, n in compare.kernel_profile(step)) / 1e3
        return dict(wall_ms=wall, device_ms=device, host_ms=host_us(step, calls) / 1e3), host_profile(step, calls, top)
    return compare.on_pass(run, leaves, pass_, what)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="linear_attention,scalar_decay")
    ap.add_argument("--shapes", default="8,4096,64,64", help="B,T,K,V;... (H = 16, bf16)")
    ap.add_argument("--pass", dest="passes", default="fwd,fwd+bwd")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    import mixforge as mf

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    info = compare.versions()
    rows, profiles = [], []
    for case in compare._cases(set(filter(None, args.only.split(",")))):
        ops = mf.compile(case.mixer)
        for (B, T, K, V) in compare._parse_shapes(args.shapes):
            H, dtype = 16, torch.bfloat16
            x = random_inputs(case.mixer, B=B, T=T, H=H, K=K, V=V, G=case.G, dtype=dtype, device="cuda", seed=0)
            fn_ours = getattr(ops, case.path)
            sides = {"ours": lambda: fn_ours(**x)[0]}
            try:
                sides["peer"] = case.make_peer(x, {"scale": default_scale(case.mixer, K)})
            except Exception as e:
                print(f"[{case.name}] peer missing: {type(e).__name__}: {e}")
            for p in args.passes.split(","):
                for side, run in sides.items():
                    leaves = list(x.values())
                    row = dict(mixer=case.name, peer=case.peer, side=side, B=B, T=T, H=H, K=K, V=V, **{"pass": p})
                    try:
                        times, prof = measure_side(run, leaves, p, args.calls, args.top)
                        row.update(times)
                        profiles.append(f"===== {case.name} {side} B={B} T={T} K={K} V={V} {p}\n{prof}")
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    for t_ in leaves:
                        t_.requires_grad_(False)
                        t_.grad = None
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    path = out / f"host_time-{stamp}.json"
    path.write_text(json.dumps({**info, "rows": rows}, indent=1))
    (out / f"host_time-{stamp}-profiles.txt").write_text("\n".join(profiles))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
