"""The first forward+backward of a zoo mixer on a fresh machine: compilation only, no tuning.

    python -m benchmarks.first_call [--mixers gla,mamba2,...] [--shape 4,4096,16,128,128] [--out DIR]
        [--compile-jobs 0,16]

Each mixer runs in its own fresh Python process with empty Triton and mixforge
caches (new temporary TRITON_CACHE_DIR and MIXFORGE_CACHE_DIR), one after the
other so that they do not share the CPU. Measured inside that process, from
before `import mixforge` to the end of the first backward (synchronized):
the import, code generation, the config lookup (shipped defaults or the
heuristic; nothing tunes) and every kernel's compilation. The second call's
time is reported too, to show that all of it was one-off. Writes
first_call-<stamp>.json with device, versions and date.

--compile-jobs runs every mixer once per value of MIXFORGE_COMPILE_JOBS (the
threads that compile a first call's kernels ahead of it, codegen/launch.py; 0:
each kernel compiles as it launches). A row records what that step did
(`ahead`: launches recorded, kernels, errors, seconds).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIXERS = "gla,mamba2,retnet,rwkv6,hgrn2,linear_attention"

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import mixforge as mf
from mixforge.spec.testing import random_inputs
name = sys.argv[1]
B, T, H, K, V = (int(v) for v in sys.argv[2].split(","))
mixer = mf.load_mixer(name)
x = random_inputs(mixer, B=B, T=T, H=H, K=K, V=V, dtype=torch.bfloat16, device="cuda", seed=0)
x = {n: t.requires_grad_(True) for n, t in x.items()}
torch.cuda.synchronize()
t_inputs = time.perf_counter()
ops = mf.compile(mixer)
t_compile = time.perf_counter()
def step():
    y, _ = ops.chunk(**x)
    y.float().square().mean().backward()
    torch.cuda.synchronize()
step()
t_first = time.perf_counter()
step()
t_second = time.perf_counter()
from mixforge.codegen import launch
print(json.dumps(dict(mixer=name, first_call_s=t_first - t0, import_and_inputs_s=t_inputs - t0,
                      codegen_s=t_compile - t_inputs, first_fwd_bwd_s=t_first - t_compile,
                      second_fwd_bwd_s=t_second - t_first, call_s=t_first - t_inputs,
                      dynamo_imported="torch._dynamo" in sys.modules, ahead=launch.last_report)))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.first_call", description=__doc__.split("\n\n")[0])
    p.add_argument("--mixers", default=MIXERS)
    p.add_argument("--shape", default="4,4096,16,128,128", help="B,T,H,K,V (bf16)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--compile-jobs", default=None,
                   help="comma-separated MIXFORGE_COMPILE_JOBS values, each mixer run once per value (default: unset)")
    a = p.parse_args(argv)
    import torch
    import triton

    if not torch.cuda.is_available():
        print("benchmarks.first_call needs a CUDA device", file=sys.stderr)
        return 2
    info = {"benchmark": "first_call", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": triton.__version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "shape": a.shape, "dtype": "bf16", "cpu_count": os.cpu_count(), "rows": []}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"first_call-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    jobs = [j.strip() for j in a.compile_jobs.split(",")] if a.compile_jobs else [None]
    runs = [(m.strip(), j) for j in jobs for m in a.mixers.split(",") if m.strip()]
    for name, job in runs:
        with tempfile.TemporaryDirectory() as tc, tempfile.TemporaryDirectory() as mc:
            env = dict(os.environ, TRITON_CACHE_DIR=tc, MIXFORGE_CACHE_DIR=mc)
            if job is not None:
                env["MIXFORGE_COMPILE_JOBS"] = job
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", _CHILD, name, a.shape], env=env, capture_output=True,
                               text=True, timeout=600)
            wall = time.perf_counter() - t0
        if r.returncode != 0:
            row = dict(mixer=name, error=(r.stderr or r.stdout)[-1500:])
        else:
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["process_wall_s"] = wall
        row["compile_jobs"] = job
        info["rows"].append(row)
        path.write_text(json.dumps(info, indent=1))
        print(json.dumps(row), flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
