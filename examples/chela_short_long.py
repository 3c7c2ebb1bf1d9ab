"""CHELA's short-long design: a short conv and a long FFT convolution in front of a linear-attention mixer.

    python examples/chela_short_long.py [--out chela.png]

Builds the layer, runs a packed batch of two sequences (the convolutions do
not leak across them), and draws the implicit attention of the mixer on the
convolved inputs. Only the plot needs no kernels; the forward pass uses
`mixforge.compile` (Triton's interpreter on a CPU).
"""
import argparse
import os

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="chela_attention.png")
    p.add_argument("--mixer", default="gla")
    a = p.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import mixforge as mf

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    layer = mf.MixerLayer(a.mixer, d_model=64, num_heads=2, short_conv=True, long_conv=True, long_conv_len=128).to(dev)
    print(layer)
    x = torch.randn(1, 48, 64, device=dev)
    cu = torch.tensor([0, 20, 48], device=dev)                 # two sequences packed along T
    y, state = layer(x, cu_seqlens=cu, use_cache=True)
    print("y", tuple(y.shape), "state rows", state.batch_size, "positions", state.position.tolist())
    mf.plot_attention_map(layer, x[:, :20], out=a.out, title=f"{a.mixer} with short and long convs")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
