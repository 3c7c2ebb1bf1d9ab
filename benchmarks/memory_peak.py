"""What is alive at the peak of one fwd+bwd: the allocations behind compare's peak-memory column.

    python -m benchmarks.memory_peak [--only mamba2] [--shapes "16,2048,128,128"] [--peer] --out DIR

For every case of benchmarks.compare at every shape, on compare's inputs: one fwd+bwd (and, with --peer, the
peer's) is run once to compile, once for compare's peak_mem, then again under torch.cuda.memory's allocation
history. Replaying that history gives the peak of what the call allocated and the blocks alive at that
moment, each with the Python frame that allocated it (the innermost frame in the project, else the innermost
one). That peak counts every allocation of the call; compare's nets out the previous call's gradients, which
the call frees (`t.grad = None`), so it is lower by about the inputs' size. Writes memory_peak-<stamp>.json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path

import torch

from mixforge.spec.reference import default_scale
from mixforge.spec.testing import random_inputs

from . import compare

#: frames worth naming an allocation by: the project's own code first
OWN = ("mixforge", "codegen", "benchmarks")


def where(frames: list[dict]) -> str:
    """file:line (function) of the innermost frame in the project, else of the innermost frame."""
    for f in frames:
        if any(p in f.get("filename", "") for p in OWN):
            return f"{Path(f['filename']).name}:{f['line']} ({f['name']})"
    f = frames[0] if frames else {"filename": "?", "line": 0, "name": "?"}
    return f"{Path(f['filename']).name}:{f['line']} ({f['name']})"


def alive_at_peak(trace: list[dict]) -> tuple[int, list[dict]]:
    """(peak bytes, the blocks alive then) over a device trace of alloc / free_requested events."""
    live: dict[int, dict] = {}
    total = peak = 0
    at_peak: list[dict] = []
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, list(live.values())
        elif ev["action"] == "free_requested" and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]
    return peak, at_peak


def grouped(blocks: list[dict]) -> list[dict]:
    """The blocks alive at the peak, summed per allocating frame, largest first."""
    out: dict[str, dict] = {}
    for b in blocks:
        w = where(b.get("frames", []))
        e = out.setdefault(w, dict(where=w, MiB=0.0, blocks=0, sizes_MiB=[]))
        e["MiB"] += b["size"] / 2**20
        e["blocks"] += 1
        e["sizes_MiB"].append(round(b["size"] / 2**20, 1))
    return sorted(out.values(), key=lambda e: -e["MiB"])


def record(step) -> tuple[int, list[dict]]:
    """Peak bytes of one call of `step` and what was alive then (step already ran once: compiled)."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
    try:
        step()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][torch.cuda.current_device()]
    peak, blocks = alive_at_peak(trace)
    return peak, grouped(blocks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="mamba2")
    ap.add_argument("--shapes", default="16,2048,128,128", help="B,T,K,V;... (H = 16, bf16)")
    ap.add_argument("--peer", action="store_true", help="the peer's fwd+bwd too")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    import mixforge as mf

    res = dict(compare.versions(), rows=[])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"memory_peak-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    for case in compare._cases(set(args.only.split(","))):
        ops = mf.compile(case.mixer)
        for B, T, K, V in compare._parse_shapes(args.shapes):
            H = 16
            x = random_inputs(case.mixer, B=B, T=T, H=H, K=K, V=V, G=case.G, dtype=torch.bfloat16,
                              device="cuda", seed=0)
            leaves = [t for t in x.values() if t.is_floating_point()]
            sides = [("ours", lambda: getattr(ops, case.path)(**x)[0])]
            if args.peer:   # made before the inputs require grad, as compare makes it
                sides.append(("peer", case.make_peer(x, {"scale": default_scale(case.mixer, K)})))
            for side, run in sides:
                def measured(step):
                    step()   # compiled
                    return compare.peak_mem(step), record(step)
                base, (peak, alive) = compare.on_pass(run, leaves, "fwd+bwd", measured)
                row = dict(mixer=case.name, side=side, B=B, T=T, H=H, K=K, V=V, peak_MiB=round(peak / 2**20, 1),
                           compare_peak_MiB=round(base / 2**20, 1), alive=alive)
                res["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "alive"}), flush=True)
                for a in alive[:12]:
                    print(f"    {a['MiB']:8.1f} MiB  {a['blocks']:3d}  {a['where']}", flush=True)
                path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
