"""MQAR: multi-query associative recall (the Zoology setup), trained with MixerLayers.

    python -m benchmarks.mqar --mixer gla [--device cuda] [--steps N] [--out DIR]
    python -m benchmarks.mqar --mixer gla,metala,mamba2,retnet,linear_attention,softmax --device cuda
    python -m benchmarks.mqar --mixer softmax --tiny          # a few seconds on a CPU

Data (Arora, Eyuboglu et al., "Zoology", 2023): each sequence starts with
`num_kv_pairs` key-value pairs (keys from the lower half of the vocabulary,
values from the upper half), followed by queries: each key appears once more
at a power-law distributed gap, and the model must predict its value at the
next position. All other positions hold random tokens and carry no loss.
Defaults follow Zoology's hardest common setting: sequence length 256, 64
key-value pairs, vocabulary 8192, d_model 128, two layers. As in Zoology,
training draws from a mix of easier segments too (length 64 with 4 pairs, 128
with 8, 256 with 16, 32 and 64, weighted 5:1:1:1:1 like Zoology's example
counts): trained on the hardest segment alone, every model sits on a long
plateau at chance first (softmax attention for 2000 steps in our runs, the
linear mixers for more than 4000). `--no-mix` trains on the main segment only.
The reported accuracy is on held-out sequences of the main segment; the
accuracy of every segment is recorded too.

Model: token embedding -> 2 x [LayerNorm -> sequence mixer -> residual,
LayerNorm -> MLP (4x, GELU) -> residual] -> LayerNorm -> LM head. The mixer is
a `mixforge.MixerLayer` of the named zoo system (short conv on, H = 2), or,
for `softmax`, causal scaled-dot-product attention with the same projections
and short conv. Training draws fresh batches every step (AdamW, warmup then
cosine); accuracy is measured on a fixed held-out set at the query positions.

Writes `mqar_<mixer>.json` (device, torch, triton, date, mixer, steps,
accuracy, wall time, config, curve), and unless `--no-checkpoint`
`mqar_<mixer>.pt` and `mqar_<mixer>_attention.png` (per-head implicit
attention of every layer on one held-out sequence, where recall shows as
weight from each query position onto the value that followed its key).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

MIXERS = ("gla", "metala", "mamba2", "retnet", "linear_attention", "softmax")
IGNORE = -100
# Zoology's MQAR training data: (seq_len, num_kv_pairs, weight), the weights its example counts
# (100k short sequences, 20k of each longer segment); the main segment (256, 64) is the last
ZOOLOGY_MIX = ((64, 4, 5.0), (128, 8, 1.0), (256, 16, 1.0), (256, 32, 1.0), (256, 64, 1.0))


# --------------------------------------------------------------------------- data

@dataclasses.dataclass
class MQARConfig:
    vocab_size: int = 8192
    seq_len: int = 256
    num_kv_pairs: int = 64
    power_a: float = 0.01
    d_model: int = 128
    n_layers: int = 2
    num_heads: int = 2
    batch_size: int = 64
    steps: int = 4000
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.1            # fraction of steps
    eval_examples: int = 1000
    eval_every: int = 500
    seed: int = 0
    short_conv: bool = True
    long_conv: bool = False
    amp: bool = True               # bf16 autocast on CUDA; False trains in fp32
    # training mix: (seq_len, num_kv_pairs, weight) segments besides the main one; None trains on the main only
    mix: tuple | None = ZOOLOGY_MIX
    time_limit: float | None = None  # seconds of training; the run stops early (and says so) past it

    @classmethod
    def tiny(cls, **kw) -> "MQARConfig":
        """Small enough for a CPU: vocabulary 64, length 32, 4 pairs, d_model 64 (softmax recalls in ~300 steps)."""
        base = dict(vocab_size=64, seq_len=32, num_kv_pairs=4, d_model=64, num_heads=2, batch_size=16, steps=300,
                    lr=3e-3, eval_examples=256, eval_every=100, mix=None)
        base.update(kw)
        return cls(**base)

    def segment(self, seq_len: int, num_kv_pairs: int) -> "MQARConfig":
        return dataclasses.replace(self, seq_len=seq_len, num_kv_pairs=num_kv_pairs)

    def training_segments(self) -> list[tuple["MQARConfig", float]]:
        """What training draws from: the mix's segments with their weights, or the main segment alone.

        Segments longer or with more pairs than the main one are left out (a
        smaller --seq-len keeps the easier part of the mix); the main segment is
        always in.
        """
        if not self.mix:
            return [(self, 1.0)]
        segs = [(self.segment(int(L), int(P)), float(w)) for L, P, w in self.mix
                if L <= self.seq_len and P <= self.num_kv_pairs]
        if not any(c.seq_len == self.seq_len and c.num_kv_pairs == self.num_kv_pairs for c, _ in segs):
            segs.append((self, 1.0))
        return segs


def mqar_batch(n: int, cfg: MQARConfig, generator: torch.Generator, device=None):
    """(inputs [n, seq_len], labels [n, seq_len]) as in Zoology's multiquery_ar.

    Labels are IGNORE except where the input is a query key; there the label is
    the value that followed that key in the context. The random draws happen on
    the generator's device (a CUDA generator keeps training batches on the GPU);
    the result is moved to `device` if given.
    """
    V, L, P = cfg.vocab_size, cfg.seq_len, cfg.num_kv_pairs
    if L % 2 or V <= L or 4 * P > L:
        raise ValueError(f"MQAR needs an even seq_len, vocab_size > seq_len and 4 * num_kv_pairs <= seq_len; "
                         f"got seq_len={L}, vocab_size={V}, num_kv_pairs={P}")
    g = generator
    dev = g.device
    half = V // 2
    # distinct keys from 1..half-1 and distinct values from half..V-1 per example
    keys = torch.rand(n, half - 1, generator=g, device=dev).argsort(dim=1)[:, :P] + 1
    values = torch.rand(n, V - half, generator=g, device=dev).argsort(dim=1)[:, :P] + half
    context = 2 * P
    kvs = torch.stack([keys, values], dim=2).reshape(n, context)
    # query gaps: P distinct slots of `space`, drawn without replacement with p ~ power law (Gumbel top-k)
    space = (L - context) // 2
    p = cfg.power_a * torch.arange(1, space + 1, dtype=torch.float64, device=dev) ** (cfg.power_a - 1)
    u = torch.rand(n, space, generator=g, dtype=torch.float64, device=dev).clamp_min(1e-300)
    gaps = (p.log()[None] - torch.log(-torch.log(u))).topk(P, dim=1).indices
    queries = torch.zeros(n, L - context + 1, dtype=torch.long, device=dev)
    queries.scatter_(1, 2 * gaps, keys)
    examples = torch.cat([kvs, queries], dim=1)
    labels = torch.full((n, L + 1), IGNORE, dtype=torch.long, device=dev)
    labels.scatter_(1, 2 * gaps + context + 1, values)
    inputs, labels = examples[:, :-1].clone(), labels[:, 1:].clone()
    noise = torch.randint(V, inputs.shape, generator=g, device=dev)
    inputs = torch.where(inputs == 0, noise, inputs)
    if device is not None:
        inputs, labels = inputs.to(device), labels.to(device)
    return inputs, labels


# --------------------------------------------------------------------------- model

class SoftmaxAttention(nn.Module):
    """The baseline: causal softmax attention (PyTorch SDPA) with the MixerLayer's short conv."""

    def __init__(self, d_model: int, num_heads: int, conv_size: int = 4, short_conv: bool = True):
        super().__init__()
        self.H, self.Dh = num_heads, d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3 * d_model, conv_size).uniform_(-1, 1) / math.sqrt(conv_size)) \
            if short_conv else None
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def _qkv(self, x):
        from mixforge.layer import short_conv

        u = self.qkv(x)
        if self.conv_weight is not None:
            u = F.silu(short_conv(u, self.conv_weight, None)[0])
        B, T, _ = x.shape
        return [z.view(B, T, self.H, self.Dh).transpose(1, 2) for z in u.chunk(3, dim=-1)]

    def forward(self, x, state=None, cu_seqlens=None):
        if state is not None or cu_seqlens is not None:
            raise NotImplementedError("the softmax baseline supports training only")
        q, k, v = self._qkv(x)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).flatten(2))

    @torch.no_grad()
    def attention_map(self, x, cu_seqlens=None):
        q, k, _ = self._qkv(x)
        T = x.shape[1]
        s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(self.Dh)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return s.softmax(-1)


class Block(nn.Module):
    def __init__(self, d_model: int, mixer: nn.Module):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.mixer = mixer
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MQARModel(nn.Module):
    def __init__(self, cfg: MQARConfig, mixer: str, ops_factory: Callable | None = None):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, make_mixer(mixer, cfg, ops_factory)) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))

    @torch.no_grad()
    def hidden_before(self, tokens, layer: int):
        """The normed input of block `layer`'s mixer (what its attention map is computed on)."""
        x = self.embed(tokens)
        for b in self.blocks[:layer]:
            x = b(x)
        return self.blocks[layer].norm1(x)


def make_mixer(name: str, cfg: MQARConfig, ops_factory: Callable | None = None) -> nn.Module:
    if name == "softmax":
        return SoftmaxAttention(cfg.d_model, cfg.num_heads, short_conv=cfg.short_conv)
    from mixforge.layer import MixerLayer

    ops = ops_factory(name) if ops_factory is not None else None
    return MixerLayer(name, cfg.d_model, cfg.num_heads, short_conv=cfg.short_conv, long_conv=cfg.long_conv,
                      long_conv_len=cfg.seq_len, ops=ops)


# --------------------------------------------------------------------------- training

def _lr_at(step: int, cfg: MQARConfig) -> float:
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    prog = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))


@torch.no_grad()
def evaluate(model, inputs, labels, batch_size: int, autocast) -> tuple[float, float]:
    """(accuracy at the query positions, mean loss there) on a fixed set."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for i in range(0, inputs.shape[0], batch_size):
        x, y = inputs[i:i + batch_size], labels[i:i + batch_size]
        with autocast():
            logits = model(x)
        mask = y != IGNORE
        loss_sum += F.cross_entropy(logits[mask].float(), y[mask], reduction="sum").item()
        correct += (logits.argmax(-1)[mask] == y[mask]).sum().item()
        total += mask.sum().item()
    model.train()
    return correct / max(total, 1), loss_sum / max(total, 1)


def _versions() -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # pragma: no cover - triton missing
        tv = None
    return {"torch": torch.__version__, "triton": tv, "python": platform.python_version()}


def train(mixer: str, cfg: MQARConfig, *, device: str = "cpu", ops_factory: Callable | None = None,
          log: Callable[[str], None] | None = print, out: str | Path | None = None, checkpoint: bool = True) -> dict:
    """Train one model; returns (and writes, when `out` is given) the result record."""
    log = log or (lambda s: None)
    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    model = MQARModel(cfg, mixer, ops_factory).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    use_amp = dev.type == "cuda" and cfg.amp

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else torch.autocast("cpu", enabled=False)

    gen_train = torch.Generator(device=dev).manual_seed(cfg.seed + 1)       # batches drawn on the device
    gen_test = torch.Generator().manual_seed(10_000 + cfg.seed)             # the held-out set: same on any device
    test_x, test_y = mqar_batch(cfg.eval_examples, cfg, gen_test, dev)
    segments = cfg.training_segments()
    pick = torch.Generator().manual_seed(cfg.seed + 2)                      # which segment each step trains on
    weights = torch.tensor([w for _, w in segments], dtype=torch.float64)
    mix = ", ".join(f"{c.seq_len}/{c.num_kv_pairs} x{w:g}" for c, w in segments)
    log(f"mqar: {mixer}  params {n_params / 1e6:.2f}M  device {dev}  steps {cfg.steps}  "
        f"(seq {cfg.seq_len}, pairs {cfg.num_kv_pairs}, vocab {cfg.vocab_size}, d_model {cfg.d_model}; "
        f"training mix (length/pairs x weight): {mix})")
    losses, curve = [], []
    t0 = time.perf_counter()
    first_step_s = None
    stopped_early = False
    for step in range(cfg.steps):
        if cfg.time_limit is not None and time.perf_counter() - t0 > cfg.time_limit:
            stopped_early = True
            log(f"mqar: {mixer}  time limit {cfg.time_limit:.0f} s reached after {step} steps")
            break
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, cfg)
        seg = segments[int(torch.multinomial(weights, 1, generator=pick))][0] if len(segments) > 1 else cfg
        x, y = mqar_batch(cfg.batch_size, seg, gen_train, dev)
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if first_step_s is None:
            first_step_s = time.perf_counter() - t0
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            acc, test_loss = evaluate(model, test_x, test_y, max(cfg.batch_size, 64), autocast)
            curve.append({"step": step + 1, "train_loss": sum(losses[-cfg.eval_every:]) / len(losses[-cfg.eval_every:]),
                          "test_loss": test_loss, "accuracy": acc, "elapsed_s": time.perf_counter() - t0})
            log(f"  step {step + 1:6d}  train loss {curve[-1]['train_loss']:.4f}  test loss {test_loss:.4f}  "
                f"accuracy {acc:.4f}  ({curve[-1]['elapsed_s']:.1f} s)")
    steps_done = len(losses)
    if steps_done and (not curve or curve[-1]["step"] != steps_done):   # stopped between evaluations
        acc, test_loss = evaluate(model, test_x, test_y, max(cfg.batch_size, 64), autocast)
        recent = losses[-cfg.eval_every:]
        curve.append({"step": steps_done, "train_loss": sum(recent) / len(recent), "test_loss": test_loss,
                      "accuracy": acc, "elapsed_s": time.perf_counter() - t0})
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    acc = curve[-1]["accuracy"] if curve else float("nan")
    per_segment = {}
    if len(segments) > 1:
        for i, (seg, _) in enumerate(segments):
            n = min(cfg.eval_examples, 256)
            sx, sy = mqar_batch(n, seg, torch.Generator().manual_seed(20_000 + cfg.seed + i), dev)
            per_segment[f"{seg.seq_len}/{seg.num_kv_pairs}"] = evaluate(model, sx, sy, max(cfg.batch_size, 64),
                                                                         autocast)[0]
        log(f"mqar: {mixer}  accuracy per segment (length/pairs): "
            + ", ".join(f"{k} {v:.4f}" for k, v in per_segment.items()))
    result = {
        "benchmark": "mqar",
        "mixer": mixer,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        **_versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "steps": steps_done,
        "stopped_early": stopped_early,
        "accuracy": acc,
        "segment_accuracy": per_segment,
        "best_accuracy": max((c["accuracy"] for c in curve), default=float("nan")),
        "final_train_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "first_step_s": first_step_s,
        "wall_time_s": wall,
        "params": n_params,
        "config": dataclasses.asdict(cfg),
        "curve": curve,
        "losses": losses,
        "kernels": "stand-in" if ops_factory is not None else ("torch sdpa" if mixer == "softmax" else "mixforge"),
    }
    log(f"mqar: {mixer}  accuracy {acc:.4f}  wall {wall:.1f} s")
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if checkpoint:
            ck = out / f"mqar_{mixer}.pt"
            torch.save({"mixer": mixer, "config": dataclasses.asdict(cfg), "model": model.state_dict()}, ck)
            result["checkpoint"] = str(ck)
            try:
                png = out / f"mqar_{mixer}_attention.png"
                plot_checkpoint_attention(model, cfg, png, device=dev)
                result["attention_png"] = str(png)
                png = out / f"mqar_{mixer}_recall.png"
                plot_checkpoint_attention(model, cfg, png, device=dev, recall=True)
                result["recall_png"] = str(png)
            except Exception as e:  # the plot never costs the run its numbers
                result["attention_png_error"] = f"{type(e).__name__}: {e}"
                log(f"mqar: attention map not drawn: {result['attention_png_error']}")
        path = out / f"mqar_{mixer}.json"
        path.write_text(json.dumps(result, indent=1))
        log(f"mqar: wrote {path}")
    return result


# --------------------------------------------------------------------------- checkpoints and maps

def load_checkpoint(path: str | Path, *, device="cpu", ops_factory: Callable | None = None):
    """(model, config) from a checkpoint written by `train`."""
    ck = torch.load(path, map_location=device, weights_only=True)
    cfg = MQARConfig(**ck["config"])
    model = MQARModel(cfg, ck["mixer"], ops_factory).to(device)
    model.load_state_dict(ck["model"])
    model.eval()
    return model, cfg


def example_sequence(cfg: MQARConfig, device="cpu"):
    """One held-out sequence (the first of the test set) and its labels."""
    x, y = mqar_batch(1, cfg, torch.Generator().manual_seed(10_000 + cfg.seed), device)
    return x, y


def plot_checkpoint_attention(model: MQARModel, cfg: MQARConfig, out, *, layer: int | None = None, heads=None,
                              device="cpu", T: int | None = None, recall: bool = False,
                              segment: tuple[int, int] | None = None):
    """Per-head attention on a held-out sequence: every layer (default) or one; queries marked.

    Each query row is marked on the left and the position of its answer (the
    value token that followed the queried key) is circled: a layer that does the
    recall puts its weight on the circles. recall=True draws only the query rows
    against the key-value context, where that weight is visible (in the whole
    map each answer is one pixel). segment=(seq_len, num_kv_pairs) draws a
    sequence of another segment of the training mix (e.g. fewer pairs).
    """
    from mixforge.plotting import plot_attention_map

    layers = list(range(len(model.blocks))) if layer is None else [layer % len(model.blocks)]
    if segment is not None:
        L, P = segment
        if L > cfg.seq_len:
            raise ValueError(f"segment length {L} exceeds the model's seq_len {cfg.seq_len}")
        cfg = cfg.segment(int(L), int(P))
    x, y = example_sequence(cfg, device)
    if T is not None:
        x, y = x[:, :T], y[:, :T]
    maps, labels = [], []
    for li in layers:
        mixer = model.blocks[li].mixer
        M = mixer.attention_map(model.hidden_before(x, li).float()).detach().double().cpu()   # [1, H, T, T]
        hs = list(range(M.shape[1])) if heads is None else list(heads)
        bad = [h for h in hs if not 0 <= h < M.shape[1]]
        if bad:
            raise ValueError(f"heads {bad} out of range: the model has {M.shape[1]} heads")
        maps.append(M[:, hs])
        labels += [f"layer {li}, head {h}" for h in hs]
    queries = (y[0] != IGNORE).nonzero().flatten().tolist()
    # where each query's answer sits: the value token (its label) in the key-value context
    context = x[0, :2 * cfg.num_kv_pairs].tolist()
    points = [(t, context.index(int(y[0, t]))) for t in queries if int(y[0, t]) in context]
    first = model.blocks[0].mixer
    name = getattr(getattr(first, "mixer", None), "name", "softmax")
    zoom = dict(rows=queries, cols=(0, 2 * cfg.num_kv_pairs)) if recall and queries else {}
    what = (f"query rows against the {cfg.num_kv_pairs} key-value pairs" if zoom
            else "queries marked")
    return plot_attention_map(torch.cat(maps, 1), heads=list(range(len(labels))), labels=labels, out=out,
                              marks=queries, points=points, max_cols=max(2, len(maps[0][0])), **zoom,
                              title=f"MQAR {name}: {what}, the positions of their answers circled")


# --------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mqar", description=__doc__.split("\n\n")[0])
    p.add_argument("--mixer", required=True, help=f"one or more of {', '.join(MIXERS)} (comma separated), or 'all'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/mqar")
    p.add_argument("--tiny", action="store_true", help="small vocabulary, sequences and model (CPU)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--num-kv-pairs", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--long-conv", action="store_true", help="add CHELA's long convolution to every MixerLayer")
    p.add_argument("--fp32", action="store_true", help="train in fp32 (no bf16 autocast on CUDA)")
    p.add_argument("--no-mix", action="store_true", help="train on the main segment only (no Zoology mix)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop training after this many seconds, evaluate and write the result (marked stopped_early)")
    p.add_argument("--no-checkpoint", action="store_true", help="write only the JSON result")
    a = p.parse_args(argv)
    names = list(MIXERS) if a.mixer == "all" else [n.strip() for n in a.mixer.split(",") if n.strip()]
    bad = [n for n in names if n not in MIXERS]
    if bad:
        p.error(f"unknown mixer {bad[0]!r}; choose from {', '.join(MIXERS)}")
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")   # generated kernels run under Triton's interpreter
    over = {k: v for k, v in dict(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, seq_len=a.seq_len,
                                  num_kv_pairs=a.num_kv_pairs, d_model=a.d_model, eval_every=a.eval_every,
                                  long_conv=a.long_conv or None, amp=False if a.fp32 else None,
                                  mix=() if a.no_mix else None, time_limit=a.time_limit).items()
            if v is not None}
    results = []
    for name in names:
        cfg = MQARConfig.tiny(**over) if a.tiny else MQARConfig(**over)
        if cfg.eval_every > cfg.steps:
            cfg.eval_every = cfg.steps
        results.append(train(name, cfg, device=a.device, out=a.out, checkpoint=not a.no_checkpoint))
    if len(results) > 1:
        print("\nmixer              accuracy   wall s")
        for r in results:
            print(f"{r['mixer']:<18} {r['accuracy']:8.4f} {r['wall_time_s']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
