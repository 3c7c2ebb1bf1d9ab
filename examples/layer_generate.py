"""A tiny language model of MixerLayers: one training step, then prefill and token-by-token decoding.

    python examples/layer_generate.py [--mixer gla] [--device cuda]

On a CPU the generated kernels run under Triton's interpreter (slow, fp32);
keep the sizes small there.
"""
import argparse
import os

import torch
import torch.nn as nn


class TinyLM(nn.Module):
    def __init__(self, mixer, vocab=256, d_model=64, num_heads=2, n_layers=2, **layer_kw):
        super().__init__()
        import mixforge as mf

        self.embed = nn.Embedding(vocab, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.layers = nn.ModuleList(mf.MixerLayer(mixer, d_model, num_heads, **layer_kw) for _ in range(n_layers))
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens, states=None, use_cache=False):
        """logits; with states or use_cache, (logits, new states): one MixerState per layer."""
        x = self.embed(tokens)
        new = []
        for i, (norm, layer) in enumerate(zip(self.norms, self.layers)):
            if states is None and not use_cache:
                x = x + layer(norm(x))
            else:
                y, st = layer(norm(x), state=None if states is None else states[i], use_cache=True)
                x = x + y
                new.append(st)
        logits = self.head(x)
        return logits if not new else (logits, new)


@torch.no_grad()
def generate(model, prompt, n_new):
    logits, states = model(prompt, use_cache=True)            # prefill: chunk kernels
    out = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(n_new - 1):                                # decoding: step kernels, x is [B, 1, d]
        logits, states = model(out[-1], states=states)
        out.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(out, 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mixer", default="gla")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    model = TinyLM(a.mixer).to(a.device)
    tokens = torch.randint(256, (2, 32), device=a.device)
    loss = nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()                                           # training: chunk kernels, forward and backward
    print(f"training step: loss {loss.item():.3f}")
    model.eval()
    new = generate(model, tokens[:, :16], 8)
    # the same tokens from one pass over prompt + generated continuation
    full = torch.cat([tokens[:, :16], new[:, :-1]], 1)
    with torch.no_grad():
        again = model(full)[:, 15:].argmax(-1)
    print("generated:", new.tolist())
    print("one pass agrees with decoding:", bool((again == new).all()))


if __name__ == "__main__":
    main()
