"""Per-head heatmaps of a mixer's implicit attention (matplotlib, Agg; no pyplot, no display).

    fig = mf.plot_attention_map(mf.zoo.gla, inputs, heads=[0, 1], out="gla.png")
    fig = mf.plot_attention_map(layer, x, out="layer.png")      # a MixerLayer on x [B, T, d_model]

M[t, s] is the weight of the value at position s in the output at position t
(`mixforge.attention_map`, before gate and norm). Positive and negative weights
get a diverging map centred on zero, clipped at a quantile of |M| so that a few
large entries do not wash the rest out; maps with no negative entry (softmax,
normalized linear attention) get a sequential one. Entries above the diagonal
(the future) are blank.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["attention_maps", "plot_attention_map"]


def attention_maps(source: Any, inputs: Any = None, *, cu_seqlens=None, scale=None) -> torch.Tensor:
    """[B, H, T, T] float64 from a Mixer (or zoo name) and its inputs, a layer and x, or a tensor."""
    from mixforge.spec import Mixer, attention_map, load_mixer

    if isinstance(source, torch.Tensor):
        M = source
    elif isinstance(source, (Mixer, str)):
        if not isinstance(inputs, dict):
            raise TypeError("plot_attention_map(mixer, inputs): inputs must be a dict of the mixer's tensors")
        mixer = load_mixer(source)
        M = attention_map(mixer, cu_seqlens=cu_seqlens, scale=scale,
                          **{k: v.detach().double() for k, v in inputs.items()})
    elif hasattr(source, "attention_map"):
        if not isinstance(inputs, torch.Tensor):
            raise TypeError("plot_attention_map(layer, x): x must be a tensor [B, T, d_model]")
        M = source.attention_map(inputs, cu_seqlens=cu_seqlens) if cu_seqlens is not None \
            else source.attention_map(inputs)
    else:
        raise TypeError(f"cannot draw the attention of a {type(source).__name__}: pass a Mixer, a zoo name, "
                        "a MixerLayer (or any module with .attention_map(x)) or a tensor [B, H, T, T]")
    M = M.detach().to(torch.float64).cpu()
    if M.dim() == 3:
        M = M[None]
    if M.dim() != 4 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"expected an attention map [B, H, T, T], got {list(M.shape)}")
    return M


def plot_attention_map(source: Any, inputs: Any = None, *, heads: Sequence[int] | int | None = None,
                       out: str | Path | None = None, batch: int = 0, title: str | None = None,
                       marks: Sequence[int] | None = None, points: Sequence[tuple[int, int]] | None = None,
                       cu_seqlens=None, scale=None, clip: float = 0.995,
                       max_cols: int = 4, dpi: int = 120, labels: Sequence[str] | None = None,
                       rows: Sequence[int] | None = None, cols: tuple[int, int] | None = None):
    """Draw per-head heatmaps; save to `out` (PNG, SVG, PDF by suffix) if given. Returns the Figure.

    source/inputs: (Mixer or zoo name, dict of its tensors), (MixerLayer, x), or (tensor [B,H,T,T], None).
    heads: which heads (default all, at most 16); batch: which sequence of the batch.
    marks: rows to mark (for example MQAR's query positions).
    points: (t, s) entries to circle (for example where each MQAR query should look).
    labels: panel titles, one per drawn head (default "head h").
    rows, cols: zoom in: only the output positions `rows` (any list, drawn in that order) and the source
      positions cols = (start, end). For MQAR, the query rows against the key-value context show the
      recall that is one pixel wide in the whole map. marks/points keep their absolute positions.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    M = attention_maps(source, inputs, cu_seqlens=cu_seqlens, scale=scale)
    B, H, T, _ = M.shape
    if not 0 <= batch < B:
        raise ValueError(f"batch {batch} is out of range for a batch of {B}")
    if heads is None:
        heads = list(range(min(H, 16)))
    elif isinstance(heads, int):
        heads = [heads]
    heads = list(heads)
    bad = [h for h in heads if not 0 <= h < H]
    if bad or not heads:
        raise ValueError(f"heads {bad or heads} out of range: the map has {H} heads")

    A = M[batch, heads].numpy()                                     # [h, T, T]
    future = np.triu(np.ones((T, T), dtype=bool), 1)
    row_idx = np.arange(T) if rows is None else np.asarray(list(rows), dtype=np.int64)
    s0, s1 = (0, T) if cols is None else (int(cols[0]), int(cols[1]))
    if row_idx.size == 0 or row_idx.min() < 0 or row_idx.max() >= T:
        raise ValueError(f"rows: expected output positions in [0, {T}), got {list(rows) if rows is not None else []}")
    if not 0 <= s0 < s1 <= T:
        raise ValueError(f"cols: expected (start, end) with 0 <= start < end <= {T}, got {cols}")
    A, future = A[:, row_idx, s0:s1], future[row_idx, s0:s1]
    row_of = {int(t): i for i, t in enumerate(row_idx)}
    if marks:
        marks = [row_of[t] for t in marks if t in row_of]
    if points:
        points = [(row_of[t], s - s0) for t, s in points if t in row_of and s0 <= s < s1]
    past = A[:, ~future]
    finite = past[np.isfinite(past)]
    signed = finite.size > 0 and finite.min() < -1e-12 * max(1.0, np.abs(finite).max())
    lim = float(np.quantile(np.abs(finite), clip)) if finite.size else 1.0
    lim = lim if lim > 0 else (float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0)
    if signed:
        cmap, vmin, vmax = "RdBu_r", -lim, lim
    else:
        cmap, vmin, vmax = "viridis", 0.0, lim

    n = len(heads)
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels: expected {n} titles (one per drawn head), got {len(labels)}")
    ncols = min(n, max_cols)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.2 * ncols + 1.0, 3.1 * nrows + (0.5 if title else 0.2)), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    import matplotlib

    cm = matplotlib.colormaps[cmap].with_extremes(bad="#eeeeee")
    im = None
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        data = np.ma.array(A[i], mask=future | ~np.isfinite(A[i]))
        im = ax.imshow(data, cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest",
                       aspect="equal" if rows is None and cols is None else "auto",
                       extent=(s0 - 0.5, s1 - 0.5, len(row_idx) - 0.5, -0.5))
        ax.set_title(labels[i] if labels is not None else f"head {heads[i]}", fontsize=9)
        ax.tick_params(labelsize=7)
        if rows is not None:     # the drawn rows are a selection: label them with their positions
            ticks = np.linspace(0, len(row_idx) - 1, min(6, len(row_idx))).round().astype(int)
            ax.set_yticks(ticks, [str(int(row_idx[j])) for j in ticks])
        if i % ncols == 0:
            ax.set_ylabel("output position t", fontsize=8)
        if i // ncols == nrows - 1:
            ax.set_xlabel("source position s", fontsize=8)
        if marks:
            ax.scatter([s0 - 0.5] * len(marks), list(marks), marker=">", s=6, c="black", clip_on=False)
        if points:
            ax.scatter([p[1] + s0 for p in points], [p[0] for p in points], marker="o", s=30, facecolors="none",
                       edgecolors="black", linewidths=0.6)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="M[t, s]")
    if title:
        fig.suptitle(title, fontsize=10)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, bbox_inches="tight")
    return fig
