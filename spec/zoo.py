"""The catalogue: one declaration per system of the seeds that the unified form covers.

Row numbers refer to MetaLA (Chou et al., NeurIPS 2024), Table 1 ("unified
form of existing linear models": LinFormer, SSM and LinRNN families) and its
appendix table of SSMs. Every Mixer here is a kernel-level declaration: the
projections, short convolutions and output projection are the layer's job
(`mixforge.MixerLayer`). Inputs are named as in the papers where that is short.

What the unified form cannot express, and what would:

- S4D, DSS, LRU, S5: their diagonal decays are complex, exp(dt * (a + i b)).
  The unified form has a real log-decay per key. Writing a complex pair as a
  real 2x2 rotation makes the transition block-diagonal instead of diagonal,
  which the per-key decay cannot say; it would take a complex state (or a
  "rotation" decay kind: pairs of keys sharing a modulus and a phase). Their
  real-valued restrictions (S4D-Real, LRU with zero phase) *are* expressible:
  they are `mamba` with a time-invariant step.
- H3: the shift SSM is a short convolution (layer work); the diagonal SSM is
  again complex-valued as above. With a real diagonal it is `mamba`-like.
- LARA: importance sampling with several proposal distributions normalizes
  each proposal's estimate separately and then mixes them with data-dependent
  weights; that nonlinearity across feature groups is not a single
  denominator, so it needs one mixer per proposal plus a layer-level mix.
- MLLA (Mamba-like linear attention) is linear attention with elu+1 features
  and a denominator (`linear_attention`) plus RoPE on q and k and a
  locally-enhanced positional term. RoPE mixes pairs of key dims, which is not
  elementwise: the layer applies it to q and k before the mixer.
- Performer, RFA and cosFormer are declared below; their random projection (or
  the duplication of q and k into two halves) lives in the layer: the mixer
  sees the projected features.
"""
from __future__ import annotations

from .functions import cos, elu, exp, log1p, logsigmoid, relu, sigmoid, silu, sin, softplus, sqrt
from .mixer import Bonus, Mixer
from .symbols import Input, Param, h, s, t, value

# inputs shared by many declarations
q, k = Input("q"), Input("k")
v = Input("v", dim="value")
g = Input("g", dim="value")
a = Input("a")

linear_attention = Mixer(
    "linear_attention", fq=elu(q) + 1, fk=elu(k) + 1, fv=v, normalize=True,
    doc="Linear Transformer (Katharopoulos et al., 2020). MetaLA Table 1, LinFormer row: "
        "phi(x) = elu(x) + 1 features, no decay, the linear-attention denominator.",
)

retnet = Mixer(
    "retnet", fq=q, fk=k, fv=v, fa=log1p(-2 ** (-5 - h)), fg=silu(g), norm="layer",
    doc="RetNet (Sun et al., 2023). MetaLA Table 1, RetNet row: a fixed per-head decay "
        "gamma_h = 1 - 2^(-5-h), GroupNorm of each head (norm='layer'), swish output gate.",
)

lam = Param("lam", dim=None)
transnormer = Mixer(
    "transnormer", fq=silu(q), fk=silu(k), fv=v, fa=logsigmoid(lam), fg=silu(g), norm="rms",
    doc="TransNormer / TransNormerLLM (Qin et al., 2022, 2023). MetaLA Table 1, TransNormer row: "
        "no denominator but a NormAttention (RMS) on the output, a constant per-head decay "
        "(here learnable, sigmoid(lam)), and a gated output.",
)

gla = Mixer(
    "gla", fq=q, fk=k, fv=v, fa=logsigmoid(a) / 16, fg=silu(g), norm="rms",
    doc="Gated Linear Attention (Yang et al., 2024). MetaLA Table 1, GLA row: a data-dependent "
        "per-key decay alpha_t = sigmoid(a_t)^(1/16), RMS norm per head and a swish output gate.",
)

_hgrn2_decay = logsigmoid(a)
hgrn2 = Mixer(
    "hgrn2", fq=q, fk=1 - exp(_hgrn2_decay), fv=v, fa=_hgrn2_decay,
    doc="HGRN2 (Qin et al., 2024). MetaLA Table 1, HGRN2 row (LinRNN family): the key is tied "
        "to the forget gate, k_t = 1 - f_t with f_t = sigmoid(a_t) per key; q is the output gate.",
)

_k4, _u4, _w4, _r4 = Input("k", dim=None), Param("u"), Param("w", dim=None), Input("r", dim="value")
rwkv4 = Mixer(
    "rwkv4", fq=1, fk=exp(_k4), fv=v, fa=-exp(_w4), fg=sigmoid(_r4), inclusive=False,
    normalize=True, scale=1.0, bonus=Bonus(weight=exp(_u4), term=s * value),
    doc="RWKV-4 (Peng et al., 2023). MetaLA Table 1, RWKV-4 row: per channel (one key per head), "
        "k_t -> exp(k_t), a constant decay exp(-exp(w)), the state read before the current token, "
        "the current token boosted by exp(u), receptance sigmoid(r) as the output gate. As in "
        "MetaLA's unified row, the current-token bonus is added after the denominator; the paper's "
        "WKV also adds exp(u + k_t) to the denominator.",
)

w6, u6 = Input("w"), Param("u")
rwkv6 = Mixer(
    "rwkv6", fq=Input("r"), fk=k, fv=v, fa=-exp(w6), fg=silu(g), norm="layer", inclusive=False,
    scale=1.0, bonus=Bonus(weight=u6, term=s * value),
    doc="RWKV-6 'Finch' (Peng et al., 2024). MetaLA Table 1, RWKV-6 row: data-dependent per-key "
        "decay exp(-exp(w_t)), the state read before the current token (inclusive=False), the "
        "bonus u for the current token, GroupNorm per head and a swish gate.",
)

_x, _i, _r, _L = Input("x", dim="value"), Input("i", dim=None), Input("r", dim=None), Param("L", dim=None)
_griffin_decay = -8 * softplus(_L) * sigmoid(_r)
griffin = Mixer(
    "griffin", fq=1, fk=sqrt(1 - exp(2 * _griffin_decay)) * sigmoid(_i), fv=_x, fa=_griffin_decay,
    scale=1.0,
    doc="Griffin's RG-LRU (De et al., 2024). MetaLA Table 1, LinRNN family: one channel per head, "
        "a_t = exp(-8 softplus(L) sigmoid(r_t)), input scaled by sqrt(1 - a_t^2) and the input gate "
        "sigmoid(i_t). The gating branch and the convolution are layer work.",
)

_B, _C = Input("B", grouped=True), Input("C", grouped=True)
_dt, _dt_bias = Input("dt", dim=None), Param("dt_bias", dim=None)
_A_key = Param("A_log")
mamba = Mixer(
    "mamba", fq=_C, fk=softplus(_dt + _dt_bias) * _B, fv=_x, fa=-softplus(_dt + _dt_bias) * exp(_A_key),
    scale=1.0,
    doc="Mamba / S6 (Gu & Dao, 2023). MetaLA appendix table (SSM family), Mamba row: each channel "
        "is a head with one value (V = 1) and a state of K = d_state; the per-key decay "
        "exp(dt * A) with A = -exp(A_log) [H, K]; B and C shared across channels (grouped). "
        "The D skip connection is layer work.",
)

_A_head = Param("A_log", dim=None)
mamba2 = Mixer(
    "mamba2", fq=_C, fk=softplus(_dt + _dt_bias) * _B, fv=_x, fa=-softplus(_dt + _dt_bias) * exp(_A_head),
    scale=1.0,
    doc="Mamba-2 / SSD (Dao & Gu, 2024). MetaLA appendix table, Mamba-2 row: a scalar decay per "
        "head and token exp(dt * A), A = -exp(A_log) [H], dt = softplus(dt + dt_bias); B and C are "
        "grouped [B, T, G, K] and shared by H/G heads; x is the value [B, T, H, V].",
)

_metala_decay = logsigmoid(a) / 16
metala = Mixer(
    "metala", fq=q, fk=1 - exp(_metala_decay), fv=v, fa=_metala_decay, fg=silu(g), norm="rms",
    bonus=Bonus(weight=Param("u"), term=sigmoid(s * value)),
    doc="MetaLA (Chou et al., NeurIPS 2024), the paper's own design: no key matrix (the key is "
        "tied to the decay, k_t = 1 - alpha_t), a dynamic per-key decay, and self-augmentation "
        "sigma(s_t * v_t) on the current token; RMS norm and a gated output.",
)

_qw, _kw, _qn, _kn = Input("qw"), Input("kw"), Input("qn", dim=None), Input("kn", dim=None)
performer = Mixer(
    "performer", fq=exp(_qw - _qn), fk=exp(_kw - _kn), fv=v, normalize=True,
    doc="Performer, FAVOR+ (Choromanski et al., 2021). MetaLA Table 1, LinFormer family: positive "
        "random features exp(w^T x - |x|^2 / 2); the layer projects x with the random matrix "
        "(qw = W x, qn = |x|^2 / 2), the mixer applies the feature map and the denominator.",
)

_phase = Param("phase")
rfa = Mixer(
    "rfa", fq=sin(_qw + _phase), fk=sin(_kw + _phase), fv=v, fa=logsigmoid(Input("gate", dim=None)),
    normalize=True,
    doc="Random Feature Attention, gated (Peng et al., 2021). MetaLA Table 1, LinFormer family: "
        "sin/cos random Fourier features of the projected q, k (the layer duplicates them into "
        "two halves; phase is 0 on one half and pi/2 on the other, so sin becomes cos), a "
        "scalar learned gate as decay, and the denominator.",
)

_freq = Param("freq", dim=None)
cosformer = Mixer(
    "cosformer", fq=relu(q) * cos(t * _freq - _phase), fk=relu(k) * cos(t * _freq - _phase), fv=v,
    normalize=True,
    doc="cosFormer (Qin et al., 2022). MetaLA Table 1, LinFormer family: relu features reweighted "
        "by cos(pi/2 * (i - j) / M) = cos(a_i)cos(a_j) + sin(a_i)sin(a_j). The layer duplicates q "
        "and k into two halves (K doubles); phase is 0 on the first half and pi/2 on the second, "
        "freq = pi / (2 M).",
)

def _cosformer_params(H: int, K: int, T: int) -> dict:
    """cosFormer's own reweighting: phase 0 on the first half of K and pi/2 on the second (cos and sin), and
    freq = pi / (2 M) with M >= T, so that every feature is >= 0 and the denominator is positive."""
    import math

    import torch

    phase = torch.zeros(H, K, dtype=torch.float64)
    phase[:, K // 2:] = math.pi / 2
    return {"phase": phase, "freq": torch.full((H,), math.pi / (2 * max(T, 1)), dtype=torch.float64)}


#: Param values a system uses itself, by Mixer.content_hash (spec.testing.random_inputs(natural=True))
NATURAL_PARAMS = {cosformer.content_hash: _cosformer_params}

#: every zoo mixer by name
ALL: dict[str, Mixer] = {
    m.name: m
    for m in (linear_attention, retnet, transnormer, gla, hgrn2, rwkv4, rwkv6, griffin, mamba, mamba2,
              metala, performer, rfa, cosformer)
}

__all__ = list(ALL) + ["ALL"]
