"""`MixerLayer`: a declared mixer as an `nn.Module`, with the layer work around the kernels.

The Mixer declares what the kernels compute from *raw projected inputs*; the
layer produces those inputs from the residual stream and maps the mixer's
output back to it:

    x [B, T, d_model]
      -> one fused Linear for every raw Input (low-rank pairs where asked)
      -> optional short causal depthwise conv (kernel `conv_size`, + SiLU)
      -> optional CHELA long causal conv (per channel, FFT, length `long_conv_len`)
      -> reshape per shape class: [B,T,H,K], [B,T,G,K], [B,T,H,V], [B,T,H]
      -> ops.chunk / ops.recurrent (training, prefill) or ops.step (decoding)
      -> optional D skip (Mamba) -> Linear(H*V, d_model)

Three ways to call it:

    y = layer(x)                              # training: chunk path, no state
    y, state = layer(x, use_cache=True)       # prefill: a MixerState to continue from
    y, state = layer(x_t, state=state)        # decoding: x_t [B, 1, d_model] -> step path

A prefill followed by single-token steps gives the outputs of one pass over
the whole sequence (the state carries the mixer state, the conv caches and
the position). `cu_seqlens` (FlashAttention style, B = 1) packs several
sequences; their convs do not leak across sequence boundaries and a prefill
returns one state row per sequence.

Parameter initialisation follows the system each parameter comes from, chosen
by the Param's name (see `init_param`); anything else gets the documented
generic fallback, N(0, 0.1^2). `param_init={"name": tensor | callable}` overrides.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixforge.spec import Mixer, load_mixer, zoo
from mixforge.spec.errors import CallError, SpecError
from mixforge.spec.symbols import KEY, SCALAR, VALUE, t as _t_symbol

__all__ = ["MixerLayer", "MixerState", "ZOO_LAYER_DEFAULTS", "init_param", "default_conv_inputs"]


# --------------------------------------------------------------------------- defaults per system

#: layer options each zoo system uses unless the caller overrides them
ZOO_LAYER_DEFAULTS: dict[str, dict[str, Any]] = {
    # GLA: the decay goes through a rank-16 bottleneck (d -> 16 -> H*K), as in the paper
    "gla": {"low_rank": {"a": 16}},
    # MetaLA builds on GLA's decay parameterisation
    "metala": {"low_rank": {"a": 16}},
    # RWKV-6: data-dependent decay through a LoRA (rank 64 in the paper; 32 at small widths)
    "rwkv6": {"low_rank": {"w": 32}},
    # Mamba (S6): one value per channel-head, dt through a rank d/16 projection, D skip on x
    "mamba": {"head_dim_v": 1, "low_rank": {"dt": "d/16"}, "d_skip": "x"},
    # Mamba-2: D skip on x
    "mamba2": {"d_skip": "x"},
    # per-channel recurrences: one key and one value per head
    "rwkv4": {"head_dim_k": 1, "head_dim_v": 1},
    "griffin": {"head_dim_v": 1},
    # fixed random-feature phases and cosFormer's frequency are not trained
    "rfa": {"frozen": ("phase",)},
    "cosformer": {"frozen": ("phase", "freq")},
}


def default_conv_inputs(mixer: Mixer) -> tuple[str, ...]:
    """The q/k/v-like inputs: used by fq, fk or fv and by neither the decay nor the gate.

    For GLA that is q, k, v; for Mamba/Mamba-2 x, B, C (as in Mamba's conv);
    for MetaLA q, v (its key is tied to the decay input a).
    """
    qkv = {o.name for m in ("fq", "fk", "fv") for o in mixer.uses(m)}
    other = {o.name for m in ("fa", "fg") for o in mixer.uses(m)}
    return tuple(o.name for o in mixer.inputs if o.name in qkv and o.name not in other)


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def init_param(mixer_name: str, name: str, shape: tuple[int, ...], *, dim, max_len: int = 2048) -> torch.Tensor:
    """The initial value of a mixer Param, following the system it comes from.

    By name (the zoo's names, reused by variants that mean the same thing):

    * ``A_log`` per key [H, K]: log(1..K) per head (Mamba / S4D-Real); per head [H]:
      log U(1, 16) (Mamba-2).
    * ``dt_bias``: softplus^-1(dt), dt log-uniform in [1e-3, 1e-1] (Mamba).
    * ``u``: RWKV-4 log(0.3) + a zigzag over channels (its time_first); otherwise
      (RWKV-6, MetaLA, variants) small: 0.1 * zigzag over keys.
    * ``w`` per head (RWKV-4): -5 + 8 (h/(H-1))^1.35 (its time_decay spread).
    * ``lam`` (TransNormer): sigmoid(lam) = 1 - 2^(-5-h), RetNet's per-head spread.
    * ``L`` (Griffin): exp(-8 softplus(L)) = a^8 with a^8 ~ U(0.9, 0.999).
    * ``phase``: 0 on the first half of the keys, pi/2 on the second (RFA, cosFormer).
    * ``freq``: pi / (2 max_len) (cosFormer).
    * ``D`` (skip): ones.

    Anything else: the generic fallback N(0, 0.1^2).
    """
    H = shape[0]
    h = torch.arange(H, dtype=torch.float32)
    if name == "A_log":
        if dim == KEY:
            K = shape[1]
            return torch.log(torch.arange(1, K + 1, dtype=torch.float32)).expand(H, K).clone()
        return torch.log(torch.empty(shape).uniform_(1.0, 16.0))
    if name == "dt_bias":
        dt = torch.exp(torch.empty(shape).uniform_(math.log(1e-3), math.log(1e-1))).clamp_min(1e-4)
        return _inv_softplus(dt)
    if name == "u":
        n = shape[-1] if len(shape) > 1 else H
        zig = ((torch.arange(n) + 1) % 3 - 1).float() * 0.1
        if mixer_name == "rwkv4":
            return (math.log(0.3) + zig).expand(shape).clone()
        return zig.expand(shape).clone() if len(shape) > 1 else zig[:H].clone()
    if name == "w" and mixer_name == "rwkv4":
        ratio = h / max(H - 1, 1)
        w = -5.0 + 8.0 * ratio ** 1.35
        return w.view(H, *([1] * (len(shape) - 1))).expand(shape).clone()
    if name == "lam":
        lam = 1.0 - 2.0 ** (-5.0 - h)
        x = torch.log(lam) - torch.log1p(-lam)        # logit
        return x.view(H, *([1] * (len(shape) - 1))).expand(shape).clone()
    if name == "L":
        a8 = torch.empty(shape).uniform_(0.9, 0.999)
        return _inv_softplus(-torch.log(a8) / 8.0)
    if name == "phase":
        K = shape[-1]
        ph = torch.zeros(K)
        ph[K // 2:] = math.pi / 2
        return ph.expand(shape).clone()
    if name == "freq":
        return torch.full(shape, math.pi / (2 * max_len))
    if name == "D":
        return torch.ones(shape)
    return torch.randn(shape) * 0.1


# --------------------------------------------------------------------------- the state

@dataclasses.dataclass
class MixerState:
    """Everything a MixerLayer needs to continue a sequence.

    mixer:    the kernels' state: S [N, H, K, V] fp32, or (S, z [N, H, K]) when the mixer normalizes
    conv:     [N, conv_size - 1, C] the last pre-conv projected inputs (short conv), or None
    long:     [N, long_conv_len - 1, C'] the last inputs of the long conv, or None
    position: [N] int64, tokens consumed so far per sequence (the `t` of the next token)
    """

    mixer: Any
    conv: torch.Tensor | None
    long: torch.Tensor | None
    position: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.position.shape[0])

    def detach(self) -> "MixerState":
        m = tuple(x.detach() for x in self.mixer) if isinstance(self.mixer, tuple) else self.mixer.detach()
        return MixerState(m, None if self.conv is None else self.conv.detach(),
                          None if self.long is None else self.long.detach(), self.position.detach())

    def index_select(self, index: torch.Tensor) -> "MixerState":
        """Rows of the state (beam search, dropping finished sequences)."""
        def sel(x):
            return None if x is None else x.index_select(0, index)
        m = tuple(sel(x) for x in self.mixer) if isinstance(self.mixer, tuple) else sel(self.mixer)
        return MixerState(m, sel(self.conv), sel(self.long), sel(self.position))


# --------------------------------------------------------------------------- convolutions

def _seq_index(cu_seqlens: torch.Tensor, T: int):
    """(sequence of every token [T], position inside it [T], lengths [N]) from cu_seqlens."""
    cu = cu_seqlens.to(torch.long)
    tok = torch.arange(T, device=cu.device)
    seq = torch.searchsorted(cu[1:], tok, right=True)
    pos = tok - cu[seq]
    return seq, pos, cu[1:] - cu[:-1], cu


def short_conv(x: torch.Tensor, weight: torch.Tensor, cache: torch.Tensor | None,
               cu_seqlens: torch.Tensor | None = None):
    """Causal depthwise conv: y_t = sum_j weight[:, W-1-j] * x_{t-j}, within each sequence.

    x [B, T, C]; weight [C, W]; cache [B|N, W-1, C] (the inputs before x) or None (zeros).
    Returns (y [B, T, C], new cache [B|N, W-1, C]).
    """
    B, T, C = x.shape
    W = weight.shape[1]
    if cu_seqlens is None:
        hist = cache if cache is not None else x.new_zeros(B, W - 1, C)
        xp = torch.cat([hist.to(x.dtype), x], dim=1)
        if T == 0:
            return x, xp
        y = F.conv1d(xp.transpose(1, 2), weight.to(x.dtype).unsqueeze(1), groups=C).transpose(1, 2)
        return y, xp[:, xp.shape[1] - (W - 1):]
    # packed sequences: gather each tap from x or from that sequence's cache
    seq, pos, lens, cu = _seq_index(cu_seqlens, T)
    N = lens.shape[0]
    hist = cache if cache is not None else x.new_zeros(N, W - 1, C)
    flat = torch.cat([x[0], hist.to(x.dtype).reshape(N * (W - 1), C)], dim=0)
    tok = torch.arange(T, device=x.device)
    y = x.new_zeros(T, C)
    for j in range(W):
        idx = torch.where(pos >= j, tok - j, T + seq * (W - 1) + (W - 1) - (j - pos))
        y = y + flat[idx] * weight[:, W - 1 - j].to(x.dtype)
    i = torch.arange(W - 1, device=x.device)
    r = lens[:, None] - (W - 1) + i[None, :]                               # [N, W-1]
    n = torch.arange(N, device=x.device)[:, None]
    idx = torch.where(r >= 0, cu[:-1, None] + r, T + n * (W - 1) + i[None, :] + lens[:, None])
    return y[None], flat[idx]


def long_conv(x: torch.Tensor, kernel: torch.Tensor, cache: torch.Tensor | None,
              cu_seqlens: torch.Tensor | None = None):
    """Causal per-channel long conv y_t = sum_l kernel[:, l] * x_{t-l}, by FFT (fp32).

    x [B, T, C]; kernel [C, L]; cache [B|N, L-1, C] or None. Returns (y, new cache).
    Packed sequences are convolved one by one (their lengths are read on the host).
    """
    B, T, C = x.shape
    L = kernel.shape[1]
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        N = len(cu) - 1
        ys, caches = [], []
        for n in range(N):
            xn = x[:, cu[n]:cu[n + 1]]
            yn, cn = long_conv(xn, kernel, None if cache is None else cache[n:n + 1])
            ys.append(yn)
            caches.append(cn)
        return torch.cat(ys, dim=1), torch.cat(caches, dim=0)
    hist = cache.to(x.dtype) if cache is not None else x.new_zeros(B, L - 1, C)
    xp = torch.cat([hist, x], dim=1)                                       # [B, L-1+T, C]
    new_cache = xp[:, xp.shape[1] - (L - 1):]
    cd = torch.promote_types(x.dtype, torch.float32)      # fp32 at least (fp64 stays fp64)
    if T == 1:  # decoding: a dot product with the reversed kernel
        y = torch.einsum("blc,cl->bc", xp.to(cd), kernel.to(cd).flip(1))[:, None]
        return y.to(x.dtype), new_cache
    n = 1 << (xp.shape[1] + L - 1).bit_length()
    Xf = torch.fft.rfft(xp.to(cd), n=n, dim=1)
    Kf = torch.fft.rfft(kernel.to(cd).t(), n=n, dim=0)
    y = torch.fft.irfft(Xf * Kf[None], n=n, dim=1)[:, L - 1:L - 1 + T]
    return y.to(x.dtype), new_cache


# --------------------------------------------------------------------------- the layer

@dataclasses.dataclass(frozen=True)
class _InputPlan:
    name: str
    dim: Any
    grouped: bool
    shape: tuple[int, ...]      # trailing shape per token: (H, K), (G, K), (H, V), (H,)
    rank: int | None            # low-rank bottleneck, or None (part of the fused projection)

    @property
    def features(self) -> int:
        return int(math.prod(self.shape))


class _MissingOps:
    """Stands where the kernels go when this build has no `mixforge.compile`: says so when called."""

    def __init__(self, mixer: Mixer):
        self.mixer = mixer

    def _fail(self, *args, **kwargs):
        raise RuntimeError(
            f"mixforge.compile is not available in this build, so MixerLayer({self.mixer.name!r}) has no kernels "
            "to run; pass ops=<an object with .chunk/.recurrent/.step> to MixerLayer (attention maps work without)"
        )

    chunk = recurrent = step = _fail


def _load_ops(mixer: Mixer):
    import mixforge

    compile_fn = getattr(mixforge, "compile", None)
    if compile_fn is None:
        return _MissingOps(mixer)
    return compile_fn(mixer)              # with the tuner's config lookup (tuned cache, shipped defaults)


class MixerLayer(nn.Module):
    """A declared mixer as a sequence-mixing layer (see the module docstring).

    Args:
        spec: a Mixer, a zoo name or 'file.py:NAME'.
        d_model: width of the residual stream.
        num_heads: H.
        head_dim_k, head_dim_v: K and V (default d_model // num_heads; zoo defaults apply first).
        conv_size: kernel length of the short conv (4).
        short_conv: apply the short causal depthwise conv (+ `conv_activation`) to `conv_inputs`.
        long_conv: apply CHELA's long causal conv (FFT) to `long_conv_inputs`.
        long_conv_len: the long kernel's length (tokens it reaches back).
        conv_inputs: names of the inputs that get the short conv (default `default_conv_inputs`).
        long_conv_inputs: names of the inputs that get the long conv (default: `conv_inputs`).
        conv_activation: "silu" (default, as Mamba and FLA) or None.
        num_groups: G for grouped inputs (Mamba-2's B and C).
        low_rank: {"input": rank} for inputs projected through d_model -> rank -> features.
        param_init: {"param": tensor or callable(shape) -> tensor} overriding `init_param`.
        frozen: names of Params registered without gradient.
        d_skip: name of a per-value input added as D[h] * input to the output (Mamba's D), or None.
        scale: passed to the kernels (None: the mixer's default).
        mode: "chunk" (default) or "recurrent": which kernels training and prefill use.
        ops: the compiled ops to call (default `mixforge.compile(spec)`, generated when the layer is built).
        max_len: cosFormer's M for its frequency init.
        bias: bias on the projections.
    """

    def __init__(self, spec, d_model: int, num_heads: int, head_dim_k: int | None = None,
                 head_dim_v: int | None = None, conv_size: int = 4, short_conv: bool = True,
                 long_conv: bool = False, *, long_conv_len: int = 256,
                 conv_inputs: Sequence[str] | None = None, long_conv_inputs: Sequence[str] | None = None,
                 conv_activation: str | None = "silu", num_groups: int = 1,
                 low_rank: Mapping[str, int] | None = None,
                 param_init: Mapping[str, Any] | None = None, frozen: Sequence[str] | None = None,
                 d_skip: str | None | bool = True, scale: float | None = None, mode: str = "chunk",
                 ops: Any = None, max_len: int = 2048, bias: bool = False):
        super().__init__()
        mixer = load_mixer(spec)
        self.mixer = mixer
        # a zoo system's layer defaults apply to that exact declaration only
        defaults = ZOO_LAYER_DEFAULTS.get(mixer.name, {}) if zoo.ALL.get(mixer.name) == mixer else {}
        if d_model < 1 or num_heads < 1:
            raise SpecError(f"d_model and num_heads must be positive, got {d_model}, {num_heads}")
        H = num_heads
        K = head_dim_k or defaults.get("head_dim_k") or max(1, d_model // H)
        V = head_dim_v or defaults.get("head_dim_v") or max(1, d_model // H)
        has_key = any(o.dim == KEY for o in mixer.operands)
        has_value = any(o.dim == VALUE for o in mixer.operands)
        K = K if has_key else 1
        V = V if has_value else 1
        if any(o.grouped for o in mixer.inputs) and (num_groups < 1 or H % num_groups):
            raise SpecError(f"num_groups = {num_groups} must divide num_heads = {H}")
        if mode not in ("chunk", "recurrent"):
            raise SpecError(f"mode must be 'chunk' or 'recurrent', got {mode!r}")
        if conv_activation not in (None, "silu"):
            raise SpecError(f"conv_activation must be 'silu' or None, got {conv_activation!r}")
        self.d_model, self.num_heads, self.head_dim_k, self.head_dim_v = d_model, H, K, V
        self.num_groups, self.conv_size, self.scale, self.mode = num_groups, conv_size, scale, mode
        self.long_conv_len = long_conv_len
        self.conv_activation = conv_activation
        self.uses_t = any(_t_symbol in e.free_symbols for e in mixer.maps.values())

        names = [o.name for o in mixer.inputs]
        ranks = dict(defaults.get("low_rank", {})) if low_rank is None else dict(low_rank)
        for n, r in list(ranks.items()):
            if n not in names:
                raise SpecError(f"low_rank names {n!r}, which is not an input of {mixer.name!r} ({', '.join(names)})")
            if r == "d/16":
                ranks[n] = r = max(1, math.ceil(d_model / 16))
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise SpecError(f"low_rank[{n!r}] must be a positive integer, got {r!r}")
        plans = []
        for o in mixer.inputs:
            if o.dim == KEY:
                shape = (num_groups if o.grouped else H, K)
            elif o.dim == VALUE:
                shape = (H, V)
            else:
                shape = (H,)
            plans.append(_InputPlan(o.name, o.dim, o.grouped, shape, ranks.get(o.name)))
        self._plans = tuple(plans)

        # projections: one fused Linear for the full-rank inputs, a bottleneck pair for each low-rank one
        full = [p for p in plans if p.rank is None]
        self._full_names = tuple(p.name for p in full)
        self._full_sizes = tuple(p.features for p in full)
        self.proj = nn.Linear(d_model, sum(self._full_sizes), bias=bias) if full else None
        self.low_rank = nn.ModuleDict({
            p.name: nn.Sequential(nn.Linear(d_model, p.rank, bias=False), nn.Linear(p.rank, p.features, bias=True))
            for p in plans if p.rank is not None
        })

        # convolutions
        conv_names = tuple(default_conv_inputs(mixer) if conv_inputs is None else conv_inputs)
        long_names = tuple(conv_names if long_conv_inputs is None else long_conv_inputs)
        for label, group in (("conv_inputs", conv_names), ("long_conv_inputs", long_names)):
            bad = [n for n in group if n not in names]
            if bad:
                raise SpecError(f"{label} names {bad[0]!r}, which is not an input of {mixer.name!r} ({', '.join(names)})")
        size = {p.name: p.features for p in plans}
        self._conv_names = conv_names if short_conv and conv_size > 1 else ()
        self._long_names = long_names if long_conv else ()
        if self._conv_names:
            C = sum(size[n] for n in self._conv_names)
            w = torch.empty(C, conv_size).uniform_(-1.0, 1.0) / math.sqrt(conv_size)
            self.conv_weight = nn.Parameter(w)
        else:
            self.register_parameter("conv_weight", None)
        if self._long_names:
            if long_conv_len < 2:
                raise SpecError(f"long_conv_len must be at least 2, got {long_conv_len}")
            C = sum(size[n] for n in self._long_names)
            lag = torch.arange(long_conv_len, dtype=torch.float32)
            k = 0.02 * torch.randn(C, long_conv_len) * torch.exp(-lag / 16.0)
            k[:, 0] = 1.0   # starts as the identity plus a small decaying tail
            self.long_kernel = nn.Parameter(k)
        else:
            self.register_parameter("long_kernel", None)
        self.long_conv_threshold = 0.003 if long_conv else 0.0

        # the mixer's parameters
        frozen = set(defaults.get("frozen", ()) if frozen is None else frozen)
        param_init = dict(param_init or {})
        self.params = nn.ParameterDict()
        for o in mixer.params:
            shape = {KEY: (H, K), VALUE: (H, V), SCALAR: (H,)}[o.dim]
            given = param_init.pop(o.name, None)
            if given is None:
                value = init_param(mixer.name, o.name, shape, dim=o.dim, max_len=max_len)
            elif callable(given):
                value = given(shape)
            else:
                value = torch.as_tensor(given, dtype=torch.float32).clone()
            if tuple(value.shape) != shape:
                raise SpecError(f"param_init[{o.name!r}] has shape {list(value.shape)}, expected {list(shape)}")
            self.params[o.name] = nn.Parameter(value.float(), requires_grad=o.name not in frozen)
        if param_init:
            raise SpecError(f"param_init names {next(iter(param_init))!r}, which is not a parameter of {mixer.name!r}")

        # Mamba's D skip on a per-value input
        if d_skip is True:
            d_skip = defaults.get("d_skip")
        elif d_skip is False:
            d_skip = None
        if d_skip is not None:
            plan = next((p for p in plans if p.name == d_skip), None)
            if plan is None or plan.dim != VALUE:
                raise SpecError(f"d_skip must name a per-value input of {mixer.name!r}, got {d_skip!r}")
            self.D = nn.Parameter(torch.ones(H))
        else:
            self.register_parameter("D", None)
        self.d_skip = d_skip

        self.o_proj = nn.Linear(H * V, d_model, bias=bias)
        self.ops = _load_ops(mixer) if ops is None else ops

    # ---- helpers
    def extra_repr(self) -> str:
        conv = f"short_conv={list(self._conv_names)}" if self._conv_names else "short_conv=off"
        lc = f", long_conv={list(self._long_names)} (len {self.long_conv_len})" if self._long_names else ""
        return (f"mixer={self.mixer.name}, d_model={self.d_model}, H={self.num_heads}, K={self.head_dim_k}, "
                f"V={self.head_dim_v}, {conv}{lc}, mode={self.mode}")

    @property
    def state_dims(self) -> tuple[int, int, int]:
        return self.num_heads, self.head_dim_k, self.head_dim_v

    def init_state(self, batch_size: int, device=None) -> MixerState:
        """A zero state (nothing seen yet) for `batch_size` sequences."""
        device = device or next(self.parameters()).device
        H, K, V = self.state_dims
        S = torch.zeros(batch_size, H, K, V, device=device, dtype=torch.float32)
        mixer = (S, torch.zeros(batch_size, H, K, device=device)) if self.mixer.normalize else S
        size = {p.name: p.features for p in self._plans}
        conv = long = None
        if self._conv_names:
            conv = torch.zeros(batch_size, self.conv_size - 1, sum(size[n] for n in self._conv_names), device=device)
        if self._long_names:
            long = torch.zeros(batch_size, self.long_conv_len - 1, sum(size[n] for n in self._long_names),
                               device=device)
        return MixerState(mixer, conv, long, torch.zeros(batch_size, dtype=torch.long, device=device))

    def _project(self, x: torch.Tensor, state: MixerState | None, cu_seqlens):
        """Raw inputs [B, T, features] by name, after the convs; and the new conv caches."""
        flat: dict[str, torch.Tensor] = {}
        if self.proj is not None:
            for name, piece in zip(self._full_names, self.proj(x).split(self._full_sizes, dim=-1)):
                flat[name] = piece
        for name, mod in self.low_rank.items():
            flat[name] = mod(x)
        dtype = flat[self._plans[0].name].dtype
        conv_cache = long_cache = None
        if self._conv_names:
            sizes = [flat[n].shape[-1] for n in self._conv_names]
            u = torch.cat([flat[n] for n in self._conv_names], dim=-1)
            u, conv_cache = short_conv(u, self.conv_weight, None if state is None else state.conv, cu_seqlens)
            if self.conv_activation == "silu":
                u = F.silu(u)
            flat.update(zip(self._conv_names, u.split(sizes, dim=-1)))
        if self._long_names:
            sizes = [flat[n].shape[-1] for n in self._long_names]
            u = torch.cat([flat[n] for n in self._long_names], dim=-1)
            k = self.long_kernel
            if self.long_conv_threshold:
                k = torch.sign(k) * F.relu(k.abs() - self.long_conv_threshold)   # the squash of simple long convs
            u, long_cache = long_conv(u, k, None if state is None else state.long, cu_seqlens)
            flat.update(zip(self._long_names, u.split(sizes, dim=-1)))
        B, T = x.shape[:2]
        raw = {p.name: flat[p.name].to(dtype).reshape(B, T, *p.shape) for p in self._plans}
        return raw, conv_cache, long_cache

    def _params(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.params.items()}

    def mixer_inputs(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The raw inputs and parameters the kernels receive for `x`: `ops.chunk(**layer.mixer_inputs(x))`."""
        raw, _, _ = self._project(x, None, cu_seqlens)
        return {**raw, **self._params()}

    def attention_map(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """The implicit attention [B, H, T, T] (float64) of this layer on x (see `mixforge.attention_map`)."""
        from mixforge.spec import attention_map

        with torch.no_grad():
            tensors = {n: v.detach().double() for n, v in self.mixer_inputs(x, cu_seqlens).items()}
            return attention_map(self.mixer, cu_seqlens=cu_seqlens, scale=self.scale, **tensors)

    # ---- forward
    def forward(self, x: torch.Tensor, state: MixerState | None = None, cu_seqlens: torch.Tensor | None = None,
                use_cache: bool = False):
        """y [B, T, d_model]; with `state` or `use_cache`, (y, new MixerState)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise CallError(f"x: expected [B, T, d_model={self.d_model}], got {list(x.shape)}")
        B, T, _ = x.shape
        if cu_seqlens is not None and B != 1:
            raise CallError(f"cu_seqlens: packed sequences need B = 1, got B = {B}")
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        if state is not None and state.position.shape[0] != N:
            raise CallError(f"state: holds {state.position.shape[0]} sequences, the call has {N}")
        want_state = use_cache or state is not None
        if state is not None and T == 1 and cu_seqlens is None:
            return self._decode(x, state)
        if state is not None and self.uses_t:
            if cu_seqlens is not None:
                raise CallError(f"mixer {self.mixer.name!r} depends on the position t: continue packed sequences "
                                "one token at a time")
            return self._decode_loop(x, state)

        raw, conv_cache, long_cache = self._project(x, state, cu_seqlens)
        fn = self.ops.chunk if self.mode == "chunk" else self.ops.recurrent
        y, final = fn(**raw, **self._params(), initial_state=None if state is None else state.mixer,
                      output_final_state=want_state, cu_seqlens=cu_seqlens, scale=self.scale)
        y = self._finish(y, raw)
        if not want_state:
            return y
        if cu_seqlens is None:
            lens = torch.full((N,), T, dtype=torch.long, device=x.device)
        else:
            lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
        pos = lens if state is None else state.position + lens
        return y, MixerState(final, conv_cache, long_cache, pos)

    def _finish(self, y: torch.Tensor, raw: dict) -> torch.Tensor:
        """D skip and the output projection; y [B, T, H, V] (or [B, H, V])."""
        if self.D is not None:
            skip = raw[self.d_skip]
            y = y + (self.D.view(-1, 1) * skip).to(y.dtype)
        return self.o_proj(y.flatten(-2))

    def _decode(self, x: torch.Tensor, state: MixerState):
        raw, conv_cache, long_cache = self._project(x, state, None)
        step = {n: v[:, 0] for n, v in raw.items()}
        extra = {} if self.scale is None else {"scale": self.scale}
        y, new = self.ops.step(state=state.mixer, position=state.position, **step, **self._params(), **extra)
        y = self._finish(y, step)[:, None]
        return y, MixerState(new, conv_cache, long_cache, state.position + 1)

    def _decode_loop(self, x: torch.Tensor, state: MixerState):
        ys = []
        for i in range(x.shape[1]):
            y, state = self._decode(x[:, i:i + 1], state)
            ys.append(y)
        return torch.cat(ys, dim=1), state
