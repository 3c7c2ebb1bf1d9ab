"""Test helpers for the layer, MQAR, plots and demo tests.

`ReferenceOps` is a stand-in with the interface of `mixforge.compile(mixer)`
(`.chunk`, `.recurrent`, `.step`) built on the float64 reference, cast back to
the input dtype. It lives here only, for developing the layer before the
generated kernels land; `ops_for(mixer)` returns the real ops as soon as
`mixforge.compile` exists.
"""
from __future__ import annotations

import os

import torch

import mixforge as mf
from mixforge.spec.reference import Maps, apply_norm, bonus_term, default_scale, evaluate, _operand_tensor
from mixforge.spec.shapes import REFERENCE_DTYPES, CallShapes, check_names
from mixforge.spec.symbols import KEY, SCALAR, VALUE, Input

NORMALIZE_EPS = 1e-6


def _to64(x):
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return tuple(_to64(y) for y in x)
    return x.to(torch.float64)


def _to32(x):
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return tuple(_to32(y) for y in x)
    return x.to(torch.float32)


class ReferenceOps:
    """`mf.compile(mixer)`'s interface on `mf.reference` (float64, differentiable, slow)."""

    is_standin = True

    def __init__(self, mixer):
        self.mixer = mf.load_mixer(mixer)
        self.calls = {"chunk": 0, "recurrent": 0, "step": 0}

    def _run(self, kind, *, initial_state=None, output_final_state=False, cu_seqlens=None, scale=None, **tensors):
        self.calls[kind] += 1
        dtype = next(v.dtype for k, v in tensors.items()
                     if isinstance(next(o for o in self.mixer.operands if o.name == k), Input))
        y, S = mf.reference(self.mixer, initial_state=_to64(initial_state), output_final_state=output_final_state,
                            cu_seqlens=cu_seqlens, scale=scale, **{k: _to64(v) for k, v in tensors.items()})
        return y.to(dtype), _to32(S)

    def chunk(self, **kw):
        return self._run("chunk", **kw)

    def recurrent(self, **kw):
        return self._run("recurrent", **kw)

    def step(self, *, state, position=None, scale=None, **tensors):
        """One token: tensors without the T axis; position [B] (or int) is the token's t."""
        self.calls["step"] += 1
        m = self.mixer
        check_names(m, tensors)
        x = {}
        for o in m.operands:
            v = tensors[o.name]
            x[o.name] = v.unsqueeze(1) if isinstance(o, Input) else v
        dtype = next(x[o.name].dtype for o in m.inputs)
        B = next(x[o.name].shape[0] for o in m.inputs)
        H = next((x[o.name].shape[2] for o in m.inputs if not o.grouped),
                 next((x[o.name].shape[0] for o in m.params), None))
        K = next((x[o.name].shape[-1] for o in m.operands if o.dim == KEY), 1)
        V = next((x[o.name].shape[-1] for o in m.operands if o.dim == VALUE), 1)
        dev = next(iter(x.values())).device
        shapes = CallShapes(B, 1, H, K, V, B, tuple((o.name, x[o.name].shape[2]) for o in m.inputs if o.grouped),
                            dtype, dev, False)
        f64 = torch.float64
        env = {o.name: _operand_tensor(o, x[o.name], shapes, f64) for o in m.operands}
        env["h"] = torch.arange(H, device=dev, dtype=f64).view(1, 1, H, 1)
        if position is None:
            position = torch.zeros(B, dtype=torch.long, device=dev)
        pos = torch.as_tensor(position, device=dev).to(f64).reshape(-1)
        env["t"] = pos.expand(B).view(B, 1, 1, 1)
        ks, vs = (B, 1, H, K), (B, 1, H, V)
        q = evaluate(m.maps["fq"], env, ks, f64, dev)
        k = evaluate(m.maps["fk"], env, ks, f64, dev)
        v = evaluate(m.maps["fv"], env, vs, f64, dev)
        gamma = evaluate(m.maps["fa"], env, ks, f64, dev) if "fa" in m.maps else torch.zeros(ks, dtype=f64, device=dev)
        g = evaluate(m.maps["fg"], env, vs, f64, dev) if "fg" in m.maps else None
        w = evaluate(m.bonus.weight, env, (1, 1, H, K), f64, dev) if m.bonus is not None else None
        maps = Maps(q, k, v, gamma, g, w, shapes, default_scale(m, K, scale))
        if m.normalize:
            S, z = _to64(state)
        else:
            S, z = _to64(state), None
        decay = torch.exp(gamma[:, 0])
        S_new = decay[..., None] * S + k[:, 0, :, :, None] * v[:, 0, :, None, :]
        z_new = decay * z + k[:, 0] if z is not None else None
        S_read, z_read = (S_new, z_new) if m.inclusive else (S, z)
        num = torch.einsum("bhk,bhkv->bhv", q[:, 0], S_read)
        if m.normalize:
            o = num / ((q[:, 0] * z_read).sum(-1, keepdim=True) + NORMALIZE_EPS)
        else:
            o = maps.scale * num
        o = o[:, None]
        bonus = bonus_term(m, maps, {n: _to64(t) for n, t in x.items()})
        if bonus is not None:
            o = o + bonus
        y = apply_norm(m.norm, o)
        if g is not None:
            y = g * y
        new_state = (S_new.float(), z_new.float()) if m.normalize else S_new.float()
        return y[:, 0].to(dtype), new_state


def have_compile() -> bool:
    return hasattr(mf, "compile")


def ops_for(mixer):
    """The real generated ops when `mixforge.compile` exists, else the float64 stand-in."""
    if have_compile() and not os.environ.get("MIXFORGE_TEST_STANDIN"):
        return mf.compile(mf.load_mixer(mixer))
    return ReferenceOps(mixer)


# --------------------------------------------------------------------------- the stand-in itself

import pytest  # noqa: E402

from mixforge.spec.testing import random_inputs  # noqa: E402


@pytest.mark.parametrize("name", ["gla", "rwkv4", "cosformer", "metala", "mamba2"])
def test_standin_steps_match_reference(name):
    """Stepping token by token with the stand-in gives the reference's outputs and final state."""
    mixer = mf.zoo.ALL[name]
    x = random_inputs(mixer, B=2, T=7, H=2, K=4, V=3, dtype=torch.float64, seed=1)
    y_ref, S_ref = mf.reference(mixer, output_final_state=True, **x)
    ops = ReferenceOps(mixer)
    _, state = ops.chunk(output_final_state=True, **{n: v[:, :0] if v.dim() > 2 and n in {o.name for o in mixer.inputs}
                                                      else v for n, v in x.items()})
    ys = []
    for i in range(7):
        step = {n: (v[:, i] if n in {o.name for o in mixer.inputs} else v) for n, v in x.items()}
        y, state = ops.step(state=state, position=torch.full((2,), i), **step)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-6, atol=1e-6)
    got = state if not mixer.normalize else state[0]
    want = S_ref if not mixer.normalize else S_ref[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
