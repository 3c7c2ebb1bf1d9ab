"""Does an error depend on the tile config? gpu_check's forward (dense and varlen) and backward checks with
the config pinned.

    python -m benchmarks.config_check --mixer mamba2 --dtype bf16 --configs 64,64,8,2 32,128,8,2 [--out FILE]

Same inputs (seeded) for every config, so the rows differ only by the config.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import mixforge as mf
from .chunk_bench import cfg_of, forced_walk
from .gpu_check import DTYPES, TOL, check_backward, check_forward


class _Pinned:
    """ops with the chunk path's config fixed."""

    def __init__(self, ops, config):
        self.ops, self.config = ops, config

    def chunk(self, **kw):
        return self.ops.chunk(config=self.config, **kw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixer", default="mamba2")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--configs", nargs="+", default=["64,64,8,2", "32,128,8,2", "64,64,4,2"],
                   help="chunk,BV,num_warps,num_stages[,BK][,t] (benchmarks.chunk_bench.cfg_of: BK key blocks, "
                        "default all of K; t the two-pass forward)")
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=96, help="value dim (96: gpu_check's K != V backward check)")
    p.add_argument("--walk", default="rule", choices=("rule", "step", "keys", "factors"),
                   help="the split walks at any length: computing maps and decays at every step, reading the keys "
                        "pass, or only its decay factors (benchmarks.chunk_bench.forced_walk); default the rule")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    with forced_walk(a.walk):
        return _check(a)


def _check(a) -> int:
    mixer = mf.load_mixer(a.mixer)
    ops = mf.compile(mixer)
    rows = []
    for c in a.configs:
        cfg = cfg_of(c)
        for decay, T in (("normal", 1024), ("strong", 777)):
            torch.manual_seed(0)
            try:
                pinned = _Pinned(ops, cfg)
                errs = check_backward(mixer, pinned, "chunk", 1, T, 2, a.K, a.V, DTYPES[a.dtype], decay=decay, seed=1)
                for varlen in (False, True):   # the forward alone too: its outputs and final states
                    fwd = check_forward(mixer, pinned, "chunk", 1 if varlen else 2, T, 2, a.K, a.V, DTYPES[a.dtype],
                                        decay=decay, varlen=varlen)
                    errs.update({f"fwd{'_varlen' if varlen else ''}_{n}": e for n, e in fwd.items()})
            except Exception as e:
                errs = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            worst = max((v for v in errs.values() if isinstance(v, float)), default=float("nan"))
            row = dict(mixer=a.mixer, dtype=a.dtype, config=c, walk=a.walk, decay=decay, T=T, K=a.K, V=a.V, errors=errs,
                       ok=bool(worst < TOL[a.dtype]))   # NaN and an error are not ok
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
