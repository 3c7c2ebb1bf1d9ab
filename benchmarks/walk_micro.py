"""Why does a decaying states walk take 1.6x linear attention's? One experiment per hypothesis, in one call.

    python -m benchmarks.walk_micro [--chunks 512] [--out DIR]      # the GPU
    TRITON_INTERPRET=1 python -m benchmarks.walk_micro --smoke       # the CPU interpreter: the variants agree

The profile at B = 1, T = 32768, H = 16, K = V = 128 (compare-20261122-145744) has scalar decay's split states
walk at 526 us against linear attention's 330 with the same tiles, and no tile or launch config closes the gap
(strategy_bench-20261122-150738). Two suspects:

* the load: the walk reads the keys pass's decayed keys as [BT, BK] rows and feeds tl.trans of them to the
  dot. On the mma.sync path of the split walk's 32 x 32 tiles, that tile is a synchronous global load every
  step; linear attention's keys, loaded and masked through the maps, are prefetched by the pipeliner
  (chunk_compile-20261122-split-walk-loads.log, sm_90 PTX of Triton 3.6). Stored transposed, [NC, H, K, BT],
  the tile loads as the dot's operand and is pipelined too;
* the multiply of the fp32 state by the chunk decay at every step.

Each variant below walks the same chunks, as chunk_states_kernel's PRE walk does (store S^(c), then
S <- d_c S + kd_c^T v_c), reading the transposed keys unless it says `trans_load`:

  add                  no decay: S <- S + kd^T v (the floor)
  add_trans_load       the same, with the keys loaded as rows and transposed (the walk's load today)
  scalar               the decay as a scalar load used in the same step
  prefetch             the scalar loaded one step ahead
  prefetch_trans_load  the same with the row load: today's PRE walk
  vector               the decay as a [BK] tensor load, one step ahead (a per-key decay's walk)
  frame_keys           no multiply on the state: it is kept relative to the running decay D (S = D * acc), the
                       keys scaled by 1 / D before the dot and the stored copy by D (1 / D grows over the walk)
  frame_values         the same with the values scaled instead of the keys
  frame_renorm         frame_keys, renormalizing (S *= D, D = 1) whenever D falls below RENORM: what a real
                       kernel needs under strong decays; the multiply on the state is then data-dependent and rare

Outputs of every variant are compared with the float64 walk. Writes walk_micro-<stamp>.json with device,
versions, date and the median time of each variant.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

VARIANTS = ("add", "add_trans_load", "scalar", "prefetch", "prefetch_trans_load", "vector", "frame_keys",
            "frame_values", "frame_renorm")
_MODE = {name: i for i, name in enumerate(VARIANTS)}
#: frame_renorm's threshold: the micro's decays (0.9-1 per chunk) cross it every ~200 chunks on the GPU; the
#: smoke run uses 0.99 (nearly every chunk) so that the branch runs on the interpreter too
RENORM = 1e-9


@triton.jit
def walk_kernel(kd_ptr, kdT_ptr, v_ptr, dl_ptr, S_ptr, NC, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MODE: tl.constexpr, RENORM: tl.constexpr):
    i_kv, i_h = tl.program_id(0), tl.program_id(1)
    i_k, i_v = i_kv // (V // BV), i_kv % (V // BV)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    b_D = tl.load(dl_ptr + i_h) * 0 + 1.0      # frame variants: S = D * b_S (a scalar, loop-carried)
    b_dl = tl.load(dl_ptr + i_h)
    b_dlv = tl.load(dl_ptr + i_h + o_k * 0)
    for i_c in range(0, NC):
        p_S = S_ptr + ((i_c * H + i_h) * K + o_k[:, None]).to(tl.int64) * V + o_v[None, :]
        if MODE >= 6:
            tl.store(p_S, (b_S * b_D).to(S_ptr.dtype.element_ty))
        else:
            tl.store(p_S, b_S.to(S_ptr.dtype.element_ty))
        rows = (i_c * BT + o_t).to(tl.int64) * H + i_h
        if MODE == 1 or MODE == 4:
            b_kdT = tl.trans(tl.load(kd_ptr + rows[:, None] * K + o_k[None, :]))
        else:
            b_kdT = tl.load(kdT_ptr + ((i_c * H + i_h) * K + o_k[:, None]).to(tl.int64) * BT + o_t[None, :])
        b_v = tl.load(v_ptr + rows[:, None] * V + o_v[None, :])
        if MODE <= 1:
            b_S += tl.dot(b_kdT, b_v)
        elif MODE == 2:
            b_S = b_S * tl.load(dl_ptr + i_c * H + i_h) + tl.dot(b_kdT, b_v)
        elif MODE <= 4:
            b_next = tl.load(dl_ptr + (i_c + 1) * H + i_h, mask=i_c + 1 < NC, other=1.)
            b_S = b_S * b_dl + tl.dot(b_kdT, b_v)
            b_dl = b_next
        elif MODE == 5:
            b_nextv = tl.load(dl_ptr + (i_c + 1) * H + i_h + o_k * 0, mask=(o_k * 0 + i_c + 1) < NC, other=1.)
            b_S = b_S * b_dlv[:, None] + tl.dot(b_kdT, b_v)
            b_dlv = b_nextv
        else:
            b_D = b_D * tl.load(dl_ptr + i_c * H + i_h)
            if MODE == 8:
                if b_D < RENORM:
                    b_S = b_S * b_D
                    b_D = b_D * 0 + 1.0
            if MODE == 7:
                b_S += tl.dot(b_kdT, (b_v.to(tl.float32) / b_D).to(b_v.dtype))
            else:
                b_S += tl.dot((b_kdT.to(tl.float32) / b_D).to(b_kdT.dtype), b_v)


def renorms(dl, threshold: float) -> int:
    """How often frame_renorm renormalizes over the walk (all heads), simulated on the host."""
    count = 0
    for h in range(dl.shape[1]):
        D = 1.0
        for c in range(dl.shape[0]):
            D *= float(dl[c, h])
            if D < threshold:
                D, count = 1.0, count + 1
    return count


def transposed(kd, NC: int):
    """kd [NC * BT, H, K] as the keys pass would store it transposed: [NC, H, K, BT]."""
    H, K = kd.shape[1], kd.shape[2]
    return kd.view(NC, -1, H, K).permute(0, 2, 3, 1).contiguous()


def run_variant(name: str, kd, kdT, v, dl, BT: int, BK: int, BV: int, num_warps: int, num_stages: int,
                renorm: float = RENORM):
    NC, H, K, V = dl.shape[0], dl.shape[1], kd.shape[-1], v.shape[-1]
    S = torch.empty(NC, H, K, V, dtype=kd.dtype, device=kd.device)
    opts = {} if kd.device.type == "cpu" else dict(num_warps=num_warps, num_stages=num_stages)
    walk_kernel[((K // BK) * (V // BV), H)](kd, kdT, v, dl, S, NC, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
                                            MODE=_MODE[name], RENORM=renorm, **opts)
    return S


def reference(kd, v, dl, decay: bool):
    """S^(c) of every chunk in float64."""
    NC, H = dl.shape
    BT = kd.shape[0] // NC
    S = torch.zeros(H, kd.shape[-1], v.shape[-1], dtype=torch.float64)
    out = []
    for c in range(NC):
        out.append(S.clone())
        k_c = kd[c * BT:(c + 1) * BT].double().cpu()
        v_c = v[c * BT:(c + 1) * BT].double().cpu()
        d = dl[c].double().cpu()[:, None, None] if decay else 1.0
        S = S * d + torch.einsum("thk,thv->hkv", k_c, v_c)
    return torch.stack(out)


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny sizes: check the variants agree")
    ap.add_argument("--chunks", type=int, default=512)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--tiles", default="64,32,32,4,3", help="BT,BK,BV,num_warps,num_stages (the split walk's)")
    a = ap.parse_args(argv)
    if a.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":   # read by triton.jit when this module was imported
            print("--smoke runs on Triton's interpreter: set TRITON_INTERPRET=1")
            return 2
        dev, NC, H, K, V, (BT, BK, BV, W, S) = "cpu", 5, 2, 32, 32, (16, 16, 16, 4, 1)
        renorm = 0.99
    else:
        if not torch.cuda.is_available():
            print("benchmarks.walk_micro needs a CUDA device (or --smoke)")
            return 2
        dev, NC, H, K, V = "cuda", a.chunks, a.heads, 128, 128
        BT, BK, BV, W, S = (int(x) for x in a.tiles.split(","))
        renorm = RENORM
    # bf16 as the compare runs it; fp16 on the interpreter, whose bf16 arithmetic is not the GPU's
    dt = torch.float16 if a.smoke else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    kd = (torch.randn(NC * BT, H, K, generator=g) * 0.1).to(dt).to(dev)
    v = torch.randn(NC * BT, H, V, generator=g).to(dt).to(dev)
    # chunk decays in [0.9, 1): 1 / D stays below 1e24 over 512 chunks, in range for the frame variants
    dl = (0.9 + 0.1 * torch.rand(NC, H, generator=g)).to(dev)
    kdT = transposed(kd, NC)
    refs = {True: reference(kd, v, dl, True), False: reference(kd, v, dl, False)}
    doc = {"benchmark": "walk_micro", "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
           "torch": torch.__version__, "triton": triton.__version__,
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "shape": dict(chunks=NC, heads=H, K=K, V=V, BT=BT, BK=BK, BV=BV, num_warps=W, num_stages=S),
           "renorm": renorm, "renorms": renorms(dl.cpu(), renorm),
           "rows": []}
    for name in VARIANTS:
        out = run_variant(name, kd, kdT, v, dl, BT, BK, BV, W, S, renorm)
        row = {"variant": name, "rel_err": rel(out.float(), refs[not name.startswith("add")])}
        if dev == "cuda":
            row["ms"] = triton.testing.do_bench(lambda: run_variant(name, kd, kdT, v, dl, BT, BK, BV, W, S, renorm),
                                                warmup=25, rep=200, return_mode="median")
        doc["rows"].append(row)
        print(json.dumps(row), flush=True)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"walk_micro-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")
    bad = [r["variant"] for r in doc["rows"] if not r["rel_err"] <= 2e-2]
    if bad:
        print(f"variants off the reference: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
