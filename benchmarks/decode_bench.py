"""Decoding one token (issue #5): time per token as a user's Python loop sees it, host overhead included.

    source benchmarks/gpu_env.sh; python -m benchmarks.decode_bench [--out FILE] [--steps 1000]
        [--mixers gla,mamba2] [--batches 1,64] [--no-sweep]
    python -m benchmarks.decode_bench --smoke    # CPU: Triton's interpreter, tiny shapes, no FLA (mechanics)

For each mixer of the zoo (H=16, K=V=128, bf16 inputs, fp32 state) and batch size:

- `ops.step`: `y, S = ops.step(state=S, **token)` in a loop (a new state tensor per step);
- `decoder`: `y = dec(**token)` of `dec = ops.decoder(...)` (the token copied into static
  buffers, one CUDA graph replay, the state updated in place); `decoder.run`: the replay alone
  (the token written into `dec.inputs` by the caller); `decoder eager`: graph=False (the kernels
  launched on the static buffers every call);
- FLA's fused_recurrent_gla (gla) / fused_recurrent_simple_gla (mamba2) at T=1 with
  output_final_state, the state fed back (FLA's gla has no output gate and norm; ours does, in a
  second kernel; the features FLA needs are computed once outside the loop);
- the floor: reading and writing the fp32 state once, 2 * B*H*K*V*4 bytes, at the copy rate
  measured here (torch copy of a 512 MiB tensor, triton.testing.do_bench).

Loop times are wall clock over --steps calls (after warm-up) with one torch.cuda.synchronize at
the end, median of 3 repeats; `device_us` is do_bench's GPU time of one call (L2 flushed). A
check row per case compares a few decoder steps with ops.step steps (outputs, final state), and
the sweep times `decoder.run` with other step configs (BV, num_warps). Results go to --out
(default benchmarks/results/decode-<timestamp>.json), rewritten after every row, and a table is
printed at the end.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

if "--smoke" in sys.argv:   # before triton is imported (also set by tests/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

H, K, V = 16, 128, 128
FLA = {"gla": ("fla.ops.gla", "fused_recurrent_gla"), "mamba2": ("fla.ops.simple_gla", "fused_recurrent_simple_gla")}
SWEEP = [(32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4), (128, 8)]   # (BV, num_warps) of the step


class Bench:
    """Where the rows go: kept in memory, written to `out` after every row."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.doc = out, dict(meta, rows=[])
        out.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def add(self, **row) -> dict:
        self.doc["rows"].append(row)
        self.write()
        shown = {k: v for k, v in row.items() if k not in ("mixer", "B")}
        print(f"  {row.get('mixer', '')} B={row.get('B', '')}: {shown}", flush=True)
        return row

    def write(self) -> None:
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        tmp.replace(self.out)


def meta(args) -> dict:
    import triton

    dev = args.device
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        name = f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs)"
    else:
        name = platform.processor() or platform.machine() or "cpu"
    return {"benchmark": "decode_bench", "device": name, "torch": torch.__version__, "triton": triton.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "smoke": args.smoke, "steps": args.steps,
            "shape": {"H": args.H, "K": args.K, "V": args.V, "dtype": "bf16", "state": "fp32"}}


# ---------------------------------------------------------------------------- timing

def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_us(fn, steps: int, device, repeats: int) -> float:
    """Wall-clock microseconds per call of `fn` in a Python loop, one synchronize at the end (median)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / steps * 1e6)
    return statistics.median(times)


def device_us(fn, device):
    """GPU microseconds of one call (do_bench: events around each call, L2 flushed); None on CPU."""
    if device.type != "cuda":
        return None
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def copy_rate(device) -> float:
    """Bytes per second of a large device copy, counting what is read and what is written."""
    n = (1 << 27) if device.type == "cuda" else (1 << 22)   # fp32: 512 MiB (16 MiB on CPU)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        import triton

        s = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median") * 1e-3
    else:
        dst.copy_(src)
        t0 = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        s = (time.perf_counter() - t0) / 5
    return 2 * n * 4 / s


# ---------------------------------------------------------------------------- cases

def token(mixer, B, args, seed):
    """One token's inputs (no T axis) and the parameters, moderate logits at K = 128."""
    from mixforge.spec.testing import random_inputs

    x = random_inputs(mixer, B=B, T=1, H=args.H, K=args.K, V=args.V, G=1, dtype=torch.bfloat16,
                      device=args.device, seed=seed)
    inputs = {o.name for o in mixer.inputs}
    out = {}
    for n, t in x.items():
        if n in inputs:
            t = t[:, 0]
            if n in ("q", "k", "C", "B"):
                t = (t.float() * 0.5).to(t.dtype)
            t = t.contiguous()
        out[n] = t
    return out, {n: out[n] for n in inputs}


def start_state(ops, B, args):
    g = torch.Generator(device="cpu").manual_seed(7)
    S = (0.1 * torch.randn(B, args.H, args.K, args.V, generator=g)).to(args.device)
    if ops.plan.normalize:
        return S, torch.rand(B, args.H, args.K, generator=g).to(args.device)
    return S


def check(ops, B, args):
    """Max |difference| between a few decoder steps and ops.step steps on the same tokens."""
    toks = [token(ops.mixer, B, args, seed=100 + i) for i in range(4)]
    params = {o.name: toks[0][0][o.name] for o in ops.mixer.params}   # the model's: the same every step
    toks = [({**full, **params}, inputs) for full, inputs in toks]
    state = start_state(ops, B, args)
    pos = dict(position=5) if ops.plan.uses_t else {}
    dec = ops.decoder(state=state, **pos, **toks[0][0])
    dy = 0.0
    for i, (full, inputs) in enumerate(toks):
        y, state = ops.step(state=state, position=5 + i, **full)
        y_dec = dec(**inputs)
        dy = max(dy, (y.float() - y_dec.float()).abs().max().item())
    parts = zip(state if ops.plan.normalize else (state,), dec.state if ops.plan.normalize else (dec.state,))
    dS = max((a - b).abs().max().item() for a, b in parts)
    return dy, dS


def run_case(bench: Bench, name: str, B: int, args, floor_us: float) -> int:
    """Every measurement of one (mixer, B); a failing one is recorded and the others still run. Returns the
    number of failures."""
    import mixforge as mf
    from mixforge.codegen.config import KernelConfig

    mixer = mf.zoo.ALL[name]
    ops = mf.compile(mixer)
    full, inputs = token(mixer, B, args, seed=1)
    dev = args.device
    row = dict(mixer=name, B=B, floor_us=floor_us)
    uses_t = ops.plan.uses_t
    pos = dict(position=0) if uses_t else {}
    failed = 0

    def attempt(method, measure, **extra):
        nonlocal failed
        try:
            bench.add(**row, method=method, **extra, **measure())
        except Exception as e:
            failed += 1
            traceback.print_exc()
            bench.add(**row, method=method, **extra, error=f"{type(e).__name__}: {e}")

    def timed(fn, steps=None, repeats=None, device=False):
        us = loop_us(fn, steps or args.steps, dev, repeats or args.repeats)
        out = dict(us_per_step=us, ratio_to_floor=us / floor_us)
        if device:
            dus = device_us(fn, dev)
            out.update(device_us=dus, device_ratio_to_floor=dus / floor_us if dus else None)
        return out

    # (a) ops.step as a user's loop calls it
    def plain_step():
        box = {"S": start_state(ops, B, args), "t": 0}

        def plain():
            p = {"position": box["t"]} if uses_t else {}
            box["t"] += 1
            _, box["S"] = ops.step(state=box["S"], **p, **full)
        return timed(plain)
    attempt("ops.step", plain_step)

    # (b) the decoder: copy + replay, replay alone, eager launches on its buffers
    def decoder(method):
        def measure():
            graph = False if method == "decoder eager" else None
            dec = ops.decoder(state=start_state(ops, B, args), graph=graph, **pos, **full)
            fn = dec.run if method == "decoder.run" else (lambda: dec(**inputs))
            return dict(timed(fn, device=method == "decoder.run"), config=dec.config.to_dict(), graph=dec._use_graph)
        return measure
    for method in ("decoder", "decoder.run", "decoder eager"):
        attempt(method, decoder(method))

    def compare():
        dy, dS = check(ops, B, args)
        return dict(max_abs_diff_y=dy, max_abs_diff_state=dS, ok=dy <= 1e-2 and dS <= 1e-4)
    attempt("check decoder vs ops.step", compare)

    # (c) FLA's fused_recurrent at T = 1
    fla = f"fla {FLA[name][1]}"
    if args.smoke:
        bench.add(**row, method=fla, missing="skipped under --smoke")
    else:
        try:
            fn = fla_step(name, full, B, args)
        except Exception as e:   # FLA not installed, or an API it does not have
            bench.add(**row, method=fla, missing=f"{type(e).__name__}: {e}")
        else:
            attempt(fla, lambda: timed(fn, device=True))

    # (d) other step configs: the replay's GPU time (one config in --smoke, to exercise the code)
    for BV, warps in (SWEEP[:1] if args.smoke else SWEEP if args.sweep else []):
        def sweep(BV=BV, warps=warps):
            cfg = KernelConfig(BV=BV, num_warps=warps, num_stages=1)
            d = ops.decoder(state=start_state(ops, B, args), config=cfg, **pos, **full)
            return timed(d.run, steps=args.steps if args.smoke else max(10, args.steps // 4), repeats=1, device=True)
        attempt("sweep decoder.run", sweep, BV=BV, num_warps=warps)
    return failed


def fla_step(name: str, full: dict, B: int, args):
    """A closure running FLA's one-token fused_recurrent on these inputs, its final state fed back."""
    import importlib

    import torch.nn.functional as F

    mod, fn_name = FLA[name]
    f = getattr(importlib.import_module(mod), fn_name)
    box = {"S": (0.1 * torch.randn(B, args.H, args.K, args.V, device=args.device))}
    if name == "gla":
        q, k, v = (full[n][:, None] for n in ("q", "k", "v"))
        gk = (F.logsigmoid(full["a"].float()) / 16).to(q.dtype)[:, None]

        def run():
            _, box["S"] = f(q, k, v, gk=gk, initial_state=box["S"], output_final_state=True)
    else:   # mamba2 as simple GLA: k = softplus(dt + dt_bias) * B, log-decay -softplus(dt + dt_bias) * exp(A_log)
        dt = F.softplus(full["dt"].float() + full["dt_bias"].float())            # [B, H]
        rep = args.H // full["B"].shape[1]
        q = full["C"].repeat_interleave(rep, 1)[:, None].contiguous()
        k = (dt[..., None] * full["B"].float().repeat_interleave(rep, 1)).to(q.dtype)[:, None].contiguous()
        v = full["x"][:, None]
        g = (-dt * torch.exp(full["A_log"].float()))[:, None].contiguous()       # [B, 1, H] fp32

        def run():
            _, box["S"] = f(q, k, v, g=g, scale=1.0, initial_state=box["S"], output_final_state=True)
    with torch.no_grad():
        for _ in range(3):   # first calls compile (and may autotune)
            run()
    sync(args.device)

    def timed():
        with torch.no_grad():
            run()
    return timed


# ---------------------------------------------------------------------------- main

def table(rows) -> str:
    lines = [f"{'mixer':8} {'B':>3} {'method':34} {'us/step':>9} {'device us':>9} {'x floor':>8}  note"]
    for r in rows:
        us, dus = r.get("us_per_step"), r.get("device_us")
        ratio = r.get("ratio_to_floor") if r.get("ratio_to_floor") is not None else r.get("device_ratio_to_floor")
        method = r["method"] + (f" BV={r['BV']} w={r['num_warps']}" if "BV" in r else "")
        note = r.get("missing") or r.get("error") or ""
        if "max_abs_diff_y" in r:
            note = f"ok={r['ok']} dy={r['max_abs_diff_y']:.2e} dS={r['max_abs_diff_state']:.2e}"
        if r["method"] == "floor":
            us, note = r["floor_us"], f"copy rate {r['copy_bytes_per_s'] / 1e12:.2f} TB/s"
        lines.append(f"{r['mixer']:8} {r['B']:>3} {method:34} {_num(us):>9} {_num(dus):>9} {_num(ratio, 2):>8}  {note}")
    return "\n".join(lines)


def _num(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/decode-<timestamp>.json)")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed loop (default 1000; 3 with --smoke)")
    ap.add_argument("--mixers", default="gla,mamba2")
    ap.add_argument("--batches", default=None, help="batch sizes (default 1,64; 1,2 with --smoke)")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the step config sweep")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, H=2, K=V=16, no FLA")
    args = ap.parse_args(argv)
    args.repeats = 1 if args.smoke else 3   # timed loops per measurement; the median is reported
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            ap.error("--smoke needs TRITON_INTERPRET=1 before triton is imported")
        args.device, args.H, args.K, args.V = torch.device("cpu"), 2, 16, 16
        args.steps = args.steps or 3
        batches = args.batches or "1,2"
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: use --smoke on CPU")
        args.device, args.H, args.K, args.V = torch.device("cuda"), H, K, V
        args.steps = args.steps or 1000
        batches = args.batches or "1,64"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"benchmarks/results/decode-{stamp}.json")
    bench = Bench(out, meta(args))
    print(f"decode_bench on {bench.doc['device']}, torch {torch.__version__}, triton {bench.doc['triton']} -> {out}")

    rate = copy_rate(args.device)
    bench.doc["copy_bytes_per_s"] = rate
    failed = 0
    for name in args.mixers.split(","):
        for B in (int(b) for b in batches.split(",")):
            floor = 2 * B * args.H * args.K * args.V * 4 / rate * 1e6
            bench.add(mixer=name, B=B, method="floor", floor_us=floor, copy_bytes_per_s=rate)
            try:
                failed += run_case(bench, name, B, args, floor)
            except Exception as e:
                failed += 1
                traceback.print_exc()
                bench.add(mixer=name, B=B, method="case", error=f"{type(e).__name__}: {e}")
    print()
    print(table(bench.doc["rows"]))
    print(f"\nwrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
