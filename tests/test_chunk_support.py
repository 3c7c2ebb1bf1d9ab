"""Support for the chunked-path tests: the chunk kernels rendered over precomputed features.

`feature_module` renders templates/chunk.py.jinja with templates/chunk_testmaps.jinja as the map
macros (the identity mixer: the kernels load fq, fk, fv, fa, w directly), so the chunked algorithm
is tested on its own against a float64 recurrence in feature space, with autograd for the
gradients. The end-to-end tests (raw inputs, compiled ops) live in test_chunk_ops.py.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import tempfile
import types
from pathlib import Path

import importlib

import jinja2
import torch

from mixforge.codegen import chunk as chunk_path
from mixforge.codegen.config import KernelConfig
from mixforge.spec.shapes import resolve_call
from mixforge.spec.testing import random_inputs

R = importlib.import_module("mixforge.spec.reference")
TEMPLATES = Path(chunk_path.__file__).resolve().parent.parent / "templates"

TERMS = {
    # name: (term, d term / d s, d term / d value), expressions of b_s [rows] and b_fv [rows, BV]
    "sv": ("b_s[:, None] * b_fv", "b_fv", "b_s[:, None] + 0. * b_fv",
           lambda s, v: s * v),
    "sigmoid": ("tl.sigmoid(b_s[:, None] * b_fv)",
                "tl.sigmoid(b_s[:, None] * b_fv) * (1. - tl.sigmoid(b_s[:, None] * b_fv)) * b_fv",
                "tl.sigmoid(b_s[:, None] * b_fv) * (1. - tl.sigmoid(b_s[:, None] * b_fv)) * b_s[:, None]",
                lambda s, v: torch.sigmoid(s * v)),
}

_modules: dict = {}


def render_source(decay: str, inclusive: bool, normalize: bool, term: str | None) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    t = TERMS[term] if term else ("", "", "", None)
    chunk = types.SimpleNamespace(decay=decay, inclusive=inclusive, normalize=normalize, bonus=term is not None,
                                  term=t[0], dterm_ds=t[1], dterm_dv=t[2])
    maps = env.get_template("chunk_testmaps.jinja").make_module({"chunk": chunk})
    body = env.get_template("chunk.py.jinja").render(chunk=chunk, maps=maps)
    return "import torch\nimport triton\nimport triton.language as tl\n\n" + body


def feature_module(decay: str, inclusive: bool, normalize: bool, term: str | None):
    key = (decay, inclusive, normalize, term)
    if key not in _modules:
        src = render_source(*key)
        d = Path(tempfile.mkdtemp(prefix="mixforge-chunk-test-"))
        name = "chunk_feat_" + "_".join(str(x) for x in key)
        path = d / f"{name}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        _modules[key] = mod
    return _modules[key]


# --------------------------------------------------------------------------- features of a mixer

def compact_decay(decay: str, gamma: torch.Tensor) -> torch.Tensor | None:
    """gamma [B, T, H, K] -> the decay's own shape class."""
    if decay == "none":
        return None
    if decay == "key":
        return gamma.contiguous()
    if decay == "scalar":
        return gamma[..., 0].contiguous()
    return gamma[0, 0, :, 0].contiguous() if gamma.shape[1] else torch.zeros(gamma.shape[2], dtype=gamma.dtype)


def expand_decay(decay: str, fa, B, T, H, K, dtype=torch.float64):
    if decay == "none":
        return torch.zeros(B, T, H, K, dtype=dtype)
    if decay == "key":
        return fa
    if decay == "scalar":
        return fa[..., None].expand(B, T, H, K)
    return fa[None, None, :, None].expand(B, T, H, K)


def features_of(mixer, B=2, T=40, H=2, K=8, V=12, seed=0, decay="normal", cu_seqlens=None):
    """Float64 features (fq, fk, fv, fa compact, w) of a mixer's random inputs."""
    x = random_inputs(mixer, B=B, T=T, H=H, K=K, V=V, seed=seed, decay=decay, dtype=torch.float64)
    shapes = resolve_call(mixer, x, cu_seqlens=cu_seqlens, dtypes=R.REFERENCE_DTYPES)
    m = R.evaluate_maps(mixer, x, shapes, cu_seqlens=cu_seqlens)
    feats = dict(fq=m.q.contiguous(), fk=m.k.contiguous(), fv=m.v.contiguous(),
                 fa=compact_decay(mixer.decay_kind, m.gamma),
                 w=m.w[0, 0].contiguous() if m.w is not None else None)
    # the kernels see fp32 features: the reference gets the same values (in float64)
    feats = {n: (f.float().double() if f is not None else None) for n, f in feats.items()}
    return feats, m.scale


def term_name(mixer) -> str | None:
    if mixer.bonus is None:
        return None
    import sympy

    from mixforge.spec.symbols import s, value
    if sympy.simplify(mixer.bonus.term - s * value) == 0:
        return "sv"
    if sympy.simplify(mixer.bonus.term - sympy.Function("sigmoid")(s * value)) == 0 or "sigmoid" in str(mixer.bonus.term):
        return "sigmoid"
    raise NotImplementedError(str(mixer.bonus.term))


# --------------------------------------------------------------------------- reference in feature space

def reference_features(feats, *, decay, inclusive, normalize, term, scale, S0=None, z0=None, cu_seqlens=None):
    """o [B,T,H,V], S_T, z_T in float64 from the recurrence of ALGORITHMS.md §2 (differentiable)."""
    q, k, v = feats["fq"], feats["fk"], feats["fv"]
    B, T, H, K = q.shape
    V = v.shape[-1]
    gamma = expand_decay(decay, feats["fa"], B, T, H, K)
    mix = types.SimpleNamespace(inclusive=inclusive, normalize=normalize)
    segs = [(0, T)] * B if cu_seqlens is None else list(zip(cu_seqlens.tolist()[:-1], cu_seqlens.tolist()[1:]))
    N = len(segs)
    S0 = torch.zeros(N, H, K, V, dtype=torch.float64) if S0 is None else S0
    if normalize and z0 is None:
        z0 = torch.zeros(N, H, K, dtype=torch.float64)
    outs, Ss, zs = [], [], []
    for n, (a, b) in enumerate(segs):
        bi = n if cu_seqlens is None else 0
        sl = slice(a, b)
        o_n, S_n, z_n = R._scan(mix, q[bi:bi + 1, sl], k[bi:bi + 1, sl], v[bi:bi + 1, sl], gamma[bi:bi + 1, sl],
                                S0[n:n + 1], None if z0 is None else z0[n:n + 1], scale)
        outs.append(o_n)
        Ss.append(S_n)
        zs.append(z_n)
    o = torch.cat(outs, 0) if cu_seqlens is None else torch.cat(outs, 1)
    if term is not None:
        s = scale * (q * feats["w"] * k).sum(-1, keepdim=True)
        o = o + TERMS[term][3](s, v)
    return o, torch.cat(Ss, 0), (torch.cat(zs, 0) if normalize else None)


# --------------------------------------------------------------------------- one checked case

def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def run_case(mixer=None, *, decay=None, inclusive=True, normalize=False, term=None, feats=None, scale=None,
             B=2, T=40, H=2, K=8, V=12, seed=0, strength="normal", cu_seqlens=None, initial_state=False,
             final_state=True, config=None, grads=True, corrupt=None):
    """Run forward (and backward) of the chunked kernels on features; return {name: relative error}.

    Either a zoo-style `mixer` (features from its random inputs) or decay/inclusive/normalize/term/feats/scale.
    """
    if mixer is not None:
        decay, inclusive, normalize, term = mixer.decay_kind, mixer.inclusive, mixer.normalize, term_name(mixer)
        feats, scale = features_of(mixer, B=B, T=T, H=H, K=K, V=V, seed=seed, decay=strength,
                                   cu_seqlens=cu_seqlens)
    q = feats["fq"]
    B, T, H, K = q.shape
    V = feats["fv"].shape[-1]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    gen = torch.Generator().manual_seed(seed + 1)
    S0 = z0 = None
    if initial_state:
        S0 = torch.randn(N, H, K, V, generator=gen, dtype=torch.float64)
        z0 = torch.rand(N, H, K, generator=gen, dtype=torch.float64) + 0.5 if normalize else None
    leaves = {n: t.clone().requires_grad_(True) for n, t in feats.items() if t is not None}
    if S0 is not None:
        leaves["S0"] = S0.clone().requires_grad_(True)
        if z0 is not None:
            leaves["z0"] = z0.clone().requires_grad_(True)
    ref_o, ref_S, ref_z = reference_features(
        {n: leaves.get(n) for n in feats}, decay=decay, inclusive=inclusive, normalize=normalize, term=term,
        scale=scale, S0=leaves.get("S0"), z0=leaves.get("z0"), cu_seqlens=cu_seqlens)

    mod = feature_module(decay, inclusive, normalize, term)
    f32 = {n: (t.float().contiguous() if t is not None else torch.zeros(1)) for n, t in feats.items()}
    if corrupt is not None:  # what the kernels see differs from the reference's inputs: the check must fail
        f32 = corrupt(f32)
    call = chunk_path.ChunkCall(
        module=mod, map_args=[f32["fq"], f32["fk"], f32["fv"], f32["fa"], f32["w"]],
        B=B, T=T, H=H, K=K, V=V, N=N, scale=float(scale), decay=decay, inclusive=inclusive,
        normalize=normalize, bonus=term is not None,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(torch.int32),
        S0=None if S0 is None else S0.float().contiguous(),
        z0=None if z0 is None else z0.float().contiguous(),
        output_final_state=final_state, dtype=torch.float32, device=torch.device("cpu"))
    config = config or KernelConfig(chunk=16, sub_chunk=8, BV=16, strategy="fused")
    o, S_T, z_T = chunk_path.run_forward(call, config)
    errs = {"o": rel(o, ref_o)}
    if final_state:
        errs["S_T"] = rel(S_T, ref_S)
        if normalize:
            errs["z_T"] = rel(z_T, ref_z)
    if not grads:
        return errs
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    loss = (ref_o * do).sum()
    dS_T = dz_T = None
    if final_state:
        dS_T = torch.randn(N, H, K, V, generator=gen, dtype=torch.float64)
        loss = loss + (ref_S * dS_T).sum()
        if normalize:
            dz_T = torch.randn(N, H, K, generator=gen, dtype=torch.float64)
            loss = loss + (ref_z * dz_T).sum()
    ref_g = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
    got = chunk_path.run_backward(call, config, do.float(), None if dS_T is None else dS_T.float(),
                                  None if dz_T is None else dz_T.float())
    names = {"fq": "dfq", "fk": "dfk", "fv": "dfv", "fa": "dfa", "w": "dw", "S0": "dS0", "z0": "dz0"}
    for leaf, gname in names.items():
        if leaf not in leaves:
            continue
        ref = ref_g[leaf]
        if ref is None:
            ref = torch.zeros_like(leaves[leaf])
        val = got[gname]
        assert val is not None, f"{gname} missing"
        assert tuple(val.shape) == tuple(ref.shape), f"{gname}: shape {tuple(val.shape)} != {tuple(ref.shape)}"
        errs[gname] = rel(val, ref)
    return errs


TOL = 1e-4


def assert_close(errs: dict, tol: float = TOL):
    bad = {k: v for k, v in errs.items() if not (v < tol)}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"
