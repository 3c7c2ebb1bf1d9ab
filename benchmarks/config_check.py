"""Does a gradient error depend on the tile config? gpu_check's backward check with the config pinned.

    python -m benchmarks.config_check --mixer mamba2 --dtype bf16 --configs 64,64,8,2 32,128,8,2 [--out FILE]

Same inputs (seeded) for every config, so the rows differ only by the config.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import mixforge as mf
from mixforge.codegen.config import KernelConfig

from .gpu_check import DTYPES, check_backward


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
                   help="chunk,BV,num_warps,num_stages[,BK] (BK: the backward's key blocks; default all of K)")
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=96, help="value dim (96: gpu_check's K != V backward check)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    mixer = mf.load_mixer(a.mixer)
    ops = mf.compile(mixer)
    rows = []
    for c in a.configs:
        chunk, BV, w, st, *bk = (int(v) for v in c.split(","))
        cfg = KernelConfig(chunk=chunk, sub_chunk=16, BV=BV, num_warps=w, num_stages=st, BK=bk[0] if bk else None)
        for decay, T in (("normal", 1024), ("strong", 777)):
            torch.manual_seed(0)
            try:
                errs = check_backward(mixer, _Pinned(ops, cfg), "chunk", 1, T, 2, a.K, a.V, DTYPES[a.dtype],
                                      decay=decay, seed=1)
            except Exception as e:
                errs = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            row = dict(mixer=a.mixer, dtype=a.dtype, config=c, decay=decay, T=T, K=a.K, V=a.V, errors=errs)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
