"""Attention-map plots: the drawn pixels are the implicit attention, for mixers, layers and the CLI."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mixforge as mf
from mixforge.cli import main as cli_main
from mixforge.layer import MixerLayer
from mixforge.spec.testing import random_inputs
from test_layer_standin import ReferenceOps

PNG = b"\x89PNG\r\n\x1a\n"


def _images(fig):
    return [ax.images[0] for ax in fig.axes if ax.images]


def test_mixer_map_is_drawn_per_head(tmp_path):
    x = random_inputs(mf.zoo.gla, B=2, T=12, H=3, K=4, V=4, dtype=torch.float64, seed=0)
    out = tmp_path / "sub" / "gla.png"
    fig = mf.plot_attention_map(mf.zoo.gla, x, heads=[2, 0], batch=1, out=out, title="gla")
    assert out.read_bytes()[:8] == PNG
    M = mf.attention_map(mf.zoo.gla, **x)
    imgs = _images(fig)
    assert len(imgs) == 2
    for img, h in zip(imgs, [2, 0]):
        data = img.get_array()
        future = np.triu(np.ones((12, 12), bool), 1)
        assert (data.mask == future).all()                       # the future is blank
        np.testing.assert_allclose(data.data[~future], M[1, h].numpy()[~future])
    assert imgs[0].get_cmap().name.startswith("RdBu_r")         # q.k can be negative: diverging map
    lo, hi = imgs[0].get_clim()
    assert lo == -hi and hi > 0


def test_zoomed_map_draws_the_chosen_rows_and_columns():
    M = torch.randn(1, 2, 10, 10, dtype=torch.float64)
    rows, cols = [7, 3, 9], (2, 6)
    fig = mf.plot_attention_map(M, rows=rows, cols=cols, points=[(7, 4), (3, 0), (5, 3)], marks=[9, 5])
    for img, h in zip(_images(fig), range(2)):
        data = img.get_array()
        expect = M[0, h][rows][:, 2:6].numpy()
        future = np.triu(np.ones((10, 10), bool), 1)[rows][:, 2:6]
        assert data.shape == (3, 4) and (data.mask == future).all()
        np.testing.assert_allclose(data.data[~future], expect[~future])
        assert img.get_extent() == [1.5, 5.5, 2.5, -0.5]               # columns keep their positions
    ax = next(ax for ax in fig.axes if ax.images)
    circled = ax.collections[-1].get_offsets().tolist()
    assert circled == [[4.0, 0.0]]                                     # (3, 0) is left of cols, (5, 3) not a row
    with pytest.raises(ValueError, match="rows"):
        mf.plot_attention_map(M, rows=[10])
    with pytest.raises(ValueError, match="cols"):
        mf.plot_attention_map(M, cols=(4, 4))


def test_nonnegative_maps_get_a_sequential_colormap():
    x = random_inputs(mf.zoo.linear_attention, B=1, T=10, H=2, K=4, V=4, dtype=torch.float64, seed=1)
    fig = mf.plot_attention_map("linear_attention", x)
    img = _images(fig)[0]
    assert img.get_cmap().name.startswith("viridis") and img.get_clim()[0] == 0
    assert len(_images(fig)) == 2


def test_layer_map_reproduces_the_layer_heads():
    """For a mixer without gate, norm or bonus, heads' outputs are M @ fv on the layer's own raw inputs."""
    torch.manual_seed(0)
    layer = MixerLayer("hgrn2", 16, 2, ops=ReferenceOps("hgrn2"))
    x = torch.randn(1, 9, 16)
    M = layer.attention_map(x)
    raw = {k: v.detach().double() for k, v in layer.mixer_inputs(x).items()}
    y, _ = mf.reference(mf.zoo.hgrn2, **raw)
    torch.testing.assert_close(torch.einsum("bhts,bshv->bthv", M, raw["v"]), y)
    fig = mf.plot_attention_map(layer, x, heads=1)
    np.testing.assert_allclose(_images(fig)[0].get_array().data[np.tril_indices(9)],
                               M[0, 1].numpy()[np.tril_indices(9)])


def test_bad_requests_are_refused():
    x = random_inputs(mf.zoo.gla, B=1, T=6, H=2, K=4, V=4, dtype=torch.float64, seed=0)
    with pytest.raises(ValueError, match="out of range"):
        mf.plot_attention_map(mf.zoo.gla, x, heads=[2])
    with pytest.raises(ValueError, match="batch"):
        mf.plot_attention_map(mf.zoo.gla, x, batch=1)
    with pytest.raises(ValueError, match=r"\[B, H, T, T\]"):
        mf.plot_attention_map(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="dict"):
        mf.plot_attention_map(mf.zoo.gla, torch.zeros(1))
    with pytest.raises(TypeError, match="cannot draw"):
        mf.plot_attention_map(object(), None)
    with pytest.raises(ValueError, match="labels"):
        mf.plot_attention_map(torch.rand(1, 2, 4, 4), labels=["one"])
    fig = mf.plot_attention_map(torch.rand(1, 2, 4, 4), labels=["layer 0, head 0", "layer 1, head 0"])
    assert [ax.get_title() for ax in fig.axes if ax.images] == ["layer 0, head 0", "layer 1, head 0"]


def test_cli_attention_map(tmp_path, capsys):
    out = tmp_path / "rwkv6.png"
    assert cli_main(["attention-map", "rwkv6", "--out", str(out), "--T", "16", "--heads", "1"]) == 0
    assert out.read_bytes()[:8] == PNG and "wrote" in capsys.readouterr().out
    assert cli_main(["attention-map", "gla", "--out", str(out), "--heads", "7"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert cli_main(["attention-map", "--out", str(out)]) == 2
    assert cli_main(["attention-map", "no_such_mixer", "--out", str(out)]) == 2


def test_cli_attention_map_of_an_mqar_checkpoint(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import mqar

    cfg = mqar.MQARConfig.tiny(steps=1, eval_every=1, eval_examples=2, batch_size=2, seq_len=16, num_kv_pairs=2,
                               d_model=16)
    r = mqar.train("softmax", cfg, log=None, out=tmp_path)
    out = tmp_path / "ck.png"
    assert cli_main(["attention-map", "--checkpoint", r["checkpoint"], "--out", str(out), "--layer", "0"]) == 0
    assert out.read_bytes()[:8] == PNG
    assert r["recall_png"].endswith("mqar_softmax_recall.png") and Path(r["recall_png"]).read_bytes()[:8] == PNG
    assert cli_main(["attention-map", "--checkpoint", r["checkpoint"], "--out", str(out), "--recall",
                     "--pairs", "1"]) == 0
    assert out.read_bytes()[:8] == PNG
    assert cli_main(["attention-map", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
