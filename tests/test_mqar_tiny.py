"""MQAR benchmark: the data follows Zoology's layout, and a tiny model's loss falls on the CPU.

The training-loop test runs the MixerLayer model on the float64 stand-in ops
(a dozen steps under Triton's interpreter would take minutes); one step on the
generated kernels checks that the model runs on them and agrees.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # benchmarks/ sits at the repository root
from benchmarks import mqar  # noqa: E402
from benchmarks.mqar import IGNORE, MQARConfig, mqar_batch  # noqa: E402
import mixforge as mf  # noqa: E402
from test_layer_standin import ReferenceOps, ops_for  # noqa: E402


def test_batch_layout_is_zoologys():
    cfg = MQARConfig.tiny(vocab_size=100, seq_len=40, num_kv_pairs=5)
    x, y = mqar_batch(16, cfg, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (16, 40) and x.dtype == torch.long
    assert ((x >= 0) & (x < 100)).all()
    P = cfg.num_kv_pairs
    for row, lab in zip(x.tolist(), y.tolist()):
        keys, vals = row[0:2 * P:2], row[1:2 * P:2]
        assert len(set(keys)) == P and all(0 < k < 50 for k in keys)
        assert len(set(vals)) == P and all(50 <= v < 100 for v in vals)
        asked = [t for t, l in enumerate(lab) if l != IGNORE]
        assert len(asked) == P and min(asked) >= 2 * P          # every key is queried once, after the context
        for t in asked:
            assert row[t] in keys and lab[t] == vals[keys.index(row[t])]
    again = mqar_batch(16, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    # queries follow a power law: near gaps are far more common than distant ones
    # (with Zoology's 64 pairs at length 256 every slot is taken; 16 pairs leave room)
    big = mqar_batch(256, MQARConfig(num_kv_pairs=16), torch.Generator().manual_seed(0))[1]
    gap = ((big != IGNORE).nonzero()[:, 1] - 2 * 16) // 2
    assert (gap < 28).float().mean() > 2 * (gap >= 84).float().mean()
    with pytest.raises(ValueError, match="4 \\* num_kv_pairs"):
        mqar_batch(1, MQARConfig.tiny(num_kv_pairs=9), torch.Generator())


def _falls(result, drop=0.3):
    losses = result["losses"]
    first, last = losses[0], sum(losses[-5:]) / 5
    assert last < first - drop, f"loss did not fall: first {first:.3f}, last five {last:.3f}"


def test_softmax_baseline_loss_falls():
    cfg = MQARConfig.tiny(steps=30, eval_every=30, eval_examples=32, d_model=32, lr=1e-2, warmup=0.0)
    _falls(mqar.train("softmax", cfg, log=None))


def test_mixer_layer_model_loss_falls():
    cfg = MQARConfig.tiny(steps=14, eval_every=14, eval_examples=8, batch_size=8, seq_len=16, num_kv_pairs=2,
                          d_model=16, lr=2e-2, warmup=0.0)
    result = mqar.train("gla", cfg, log=None, ops_factory=ReferenceOps)
    _falls(result)
    assert 0.0 <= result["accuracy"] <= 1.0


def test_cli_writes_result_checkpoint_and_attention_map(tmp_path):
    assert mqar.main(["--mixer", "softmax", "--tiny", "--steps", "3", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "mqar_softmax.json").read_text())
    for key in ("device", "torch", "triton", "date", "mixer", "steps", "accuracy", "wall_time_s"):
        assert key in r, key
    assert r["steps"] == 3 and r["mixer"] == "softmax"
    png = tmp_path / "mqar_softmax_attention.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, cfg = mqar.load_checkpoint(tmp_path / "mqar_softmax.pt")
    assert cfg.steps == 3 and cfg.seq_len == MQARConfig.tiny().seq_len
    x, _ = mqar.example_sequence(cfg)
    assert model(x).shape == (1, cfg.seq_len, cfg.vocab_size)
    with pytest.raises(SystemExit):
        mqar.main(["--mixer", "nope", "--tiny"])


def test_checkpoint_of_a_mixer_layer_model_draws_its_map(tmp_path):
    cfg = MQARConfig.tiny(steps=2, eval_every=2, eval_examples=4, batch_size=2, seq_len=16, num_kv_pairs=2,
                          d_model=16)
    r = mqar.train("metala", cfg, log=None, ops_factory=ReferenceOps, out=tmp_path)
    assert "attention_png" in r, r.get("attention_png_error")
    model, cfg2 = mqar.load_checkpoint(r["checkpoint"], ops_factory=ReferenceOps)
    x, _ = mqar.example_sequence(cfg2)
    M = model.blocks[-1].mixer.attention_map(model.hidden_before(x, 1))
    assert M.shape == (1, cfg.num_heads, 16, 16) and torch.isfinite(M).all()


def test_one_training_step_on_the_generated_kernels():
    if not hasattr(mf, "compile"):
        pytest.fail("mixforge.compile does not exist: the MQAR model has no kernels to run")
    cfg = MQARConfig.tiny(seq_len=16, num_kv_pairs=2, d_model=16)
    torch.manual_seed(0)
    real = mqar.MQARModel(cfg, "gla", ops_for)
    ref = mqar.MQARModel(cfg, "gla", ReferenceOps)
    ref.load_state_dict(real.state_dict())
    x, y = mqar_batch(2, cfg, torch.Generator().manual_seed(0))
    losses = []
    for model in (real, ref):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for (n, p), (_, q) in zip(real.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_zoology_mix_trains_on_every_segment_and_reports_each():
    cfg = MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4, d_model=16, batch_size=4, steps=6, eval_every=6,
                     eval_examples=8, mix=((16, 2, 3.0), (32, 4, 1.0), (64, 4, 1.0), (32, 8, 1.0)))
    segs = cfg.training_segments()
    # harder than the main segment (longer, more pairs) is left out; the main one is in
    assert [(c.seq_len, c.num_kv_pairs, w) for c, w in segs] == [(16, 2, 3.0), (32, 4, 1.0)]
    assert [(c.seq_len, c.num_kv_pairs) for c, _ in MQARConfig(seq_len=128, num_kv_pairs=8).training_segments()] \
        == [(64, 4), (128, 8)]
    assert MQARConfig.tiny().training_segments() == [(MQARConfig.tiny(), 1.0)]
    r = mqar.train("softmax", cfg, log=None)
    assert set(r["segment_accuracy"]) == {"16/2", "32/4"}
    assert all(0.0 <= a <= 1.0 for a in r["segment_accuracy"].values())
    assert r["steps"] == 6 and not r["stopped_early"]


def test_time_limit_stops_training_and_still_reports():
    cfg = MQARConfig.tiny(steps=10_000, eval_every=10_000, eval_examples=8, batch_size=4, d_model=16,
                          time_limit=0.5)
    r = mqar.train("softmax", cfg, log=None)
    assert r["stopped_early"] and 0 < r["steps"] < 10_000
    assert r["curve"][-1]["step"] == r["steps"] and 0.0 <= r["accuracy"] <= 1.0
