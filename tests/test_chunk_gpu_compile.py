"""Triton's real compiler, for an H100 (sm_90), on the CPU: the chunked backward's kernel with all of K in
one tile and in key blocks, the key blocks' dv kernel and the two-pass forward's output kernel in key blocks. The interpreter runs the kernels as Python, which accepts code that Triton's
code generator refuses: a loop index that is a constexpr in a static loop and a tensor in a later runtime
loop compiled on the interpreter and failed on the H100 (2026-11-22). Triton's wheel brings its own ptxas,
so this needs no GPU; it runs in a subprocess, because the test process has Triton in interpreter mode."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_backward_kernel_compiles_for_sm90_with_and_without_key_blocks(tmp_path):
    mixers = ["gla", "rwkv6", "mamba2", "rfa"]      # per-key; bonus and exclusive; scalar, grouped; normalize
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # benchmarks/ importable without the checkout's own mixforge/ (the front door only) shadowing the package
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    env.update(PYTHONPATH=str(tmp_path), PYTHONSAFEPATH="1", TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-m", "benchmarks.chunk_compile", "--mixers", ",".join(mixers),
                        "--kernels", "chunk_bwd_kernel,chunk_dv_kernel,chunk_out_kernel", "--K", "256", "--V", "256", "--configs", "32,64,8,1",
                        "--key-blocks", "0", "64"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if "chunk_bwd_kernel/BK" in line]
    assert len(lines) == 2 * len(mixers), r.stdout
    assert sum("/BK64 " in line for line in lines) == len(mixers)
    # the key blocks' dv kernel and forward output kernel, only launched for them
    for kernel in ("chunk_dv_kernel", "chunk_out_kernel"):
        assert sum(f"{kernel}/BK64 " in line for line in r.stdout.splitlines()) == len(mixers), r.stdout


def test_walks_compile_for_sm90_with_their_inputs_loaded_ahead(tmp_path):
    """The states walk, the dstates walk and the fused forward's walk load the next chunk's per-row scalar
    inputs during this chunk's step (a loop-carried tile that exists only where the walk computes its maps):
    mamba2's dt (grouped keys), griffin's gates (no key), rwkv4's k (exclusive, normalize) and performer's
    norms (no decay), then the same walks reading the keys pass (PRE) or its decay factors only (FACT), split
    as at B = 1."""
    mixers = ["mamba2", "griffin", "rwkv4", "performer"]
    walks = ["chunk_states_kernel", "chunk_dstates_kernel", "chunk_fwd_kernel"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    env.update(PYTHONPATH=str(tmp_path), PYTHONSAFEPATH="1", TRITON_DEFAULT_FP_FUSION="1")
    for extra in ([], ["--state-tile", "32", "--pre"], ["--state-tile", "32", "--fact"]):
        r = subprocess.run([sys.executable, "-m", "benchmarks.chunk_compile", "--mixers", ",".join(mixers),
                            "--kernels", ",".join(walks), "--configs", "64,64,4,2", *extra],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        for kernel in walks:
            lines = [line for line in r.stdout.splitlines() if f" {kernel} " in line]
            assert len(lines) == len(mixers), r.stdout
