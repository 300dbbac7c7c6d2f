"""kvq diagnose: capture, attention-output error, end to end on a tiny Llama, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from kvq.eval.diagnose.attention_error import LayerAttention, all_errors, stored
from kvq.eval.diagnose.capture import capture, query_positions
from kvq.pipeline import Pipeline


def _qkv(hq=4, hkv=2, seq=96, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, hq, seq, d, generator=g), torch.randn(1, hkv, seq, d, generator=g),
            torch.randn(1, hkv, seq, d, generator=g))


@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
def test_exact_attention_matches_sdpa_with_gqa_and_causal_mask(d):
    q, k, v = _qkv(seq=97, d=d)
    pos = query_positions(97, 20)
    att = LayerAttention(q[:, :, pos], k, v, pos, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), is_causal=True,
        scale=0.25)[:, :, pos]  # (1, 4, n, d): query heads 0,1 read KV head 0
    assert torch.allclose(att.out.reshape(ref.shape), ref, atol=1e-5)


def test_sliding_window_mask():
    q, k, v = _qkv(hq=2, hkv=2)
    pos = query_positions(96, 10)
    att = LayerAttention(q[:, :, pos], k, v, pos, scaling=0.25, sliding_window=8)
    assert bool((att.p[..., :] > 0).sum(dim=-1).le(8).all())


def test_errors_per_kv_head_follow_planted_outliers():
    q, k, v = _qkv(seq=128)
    k[:, 1, :, 3] = 25.0 * k[:, 1, :, 3].sign()  # KV head 1: one steady outlier channel
    pos = query_positions(128, 32)
    att = LayerAttention(q[:, :, pos], k, v, pos, scaling=0.25)
    specs = {s: Pipeline.parse(s) for s in ("none", "ptok>int4", "pchan>int4")}
    e, = all_errors([att], specs, {"none": specs["none"]}, {"x": ("ptok>int4", "none")}, block=32)
    assert e.keys["none"].layer == 0.0
    naive, pchan = e.keys["ptok>int4"].heads, e.keys["pchan>int4"].heads
    assert naive[1] > 3 * naive[0]  # the outlier head breaks per-token scales
    assert pchan[1] < naive[1] / 3  # per-channel scales fix it
    assert e.joint["x"].heads == pytest.approx(naive)


def test_stored_is_what_the_cache_returns():
    from kvq.hf.layer import KVQLayer

    _, k, _ = _qkv(seq=77)
    p = Pipeline.parse("nsep>pchan>int3")
    layer = KVQLayer(p, p, prefill="quantized", block=16)
    ref, _ = layer.update(k, k)
    assert torch.equal(stored(k, p, 16, "keys"), ref)
    assert not torch.equal(ref, k)


def test_capture_matches_the_cache_and_prerope_keys(tiny):
    from transformers import DynamicCache

    model, _ = tiny
    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    caps = capture(model, ids, n_queries=8)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert len(caps) == 2
    for i, c in enumerate(caps):
        assert torch.allclose(c.k, cache.layers[i].keys, atol=1e-6)
        assert torch.allclose(c.v, cache.layers[i].values, atol=1e-6)
        assert c.q.shape == (1, 4, 8, 16)
        # RoPE rotates channel pairs: per-token norms survive it, the keys themselves do not
        assert torch.allclose(c.k_pre.norm(dim=-1), c.k.norm(dim=-1), rtol=1e-4)
        assert not torch.allclose(c.k_pre, c.k)
        assert c.weight is not None and c.weight > 0
    assert model.config._attn_implementation != "kvq_capture"  # restored


@pytest.fixture(scope="module")
def diagnosis(tiny, text_file):
    from kvq.eval.diagnose import Settings, run
    from kvq.registry import PRESETS

    PRESETS.register("testonly4", "kvq.presets:make_preset", source="test")
    PRESETS._entries["testonly4"].target = lambda: __import__("kvq").kv("ptok>int4(asym)")
    try:
        yield run(Settings(corpus=str(text_file), bits=[4], context=64, block=16, queries=16),
                  progress=False, loaded=tiny)
    finally:
        PRESETS._entries.pop("testonly4")


def test_run_end_to_end(diagnosis):
    assert len(diagnosis["layers"]) == 2
    assert {"naive4", "nsep-pchan4", "testonly4"} <= set(diagnosis["candidates"])
    assert "group size 32 does not divide head_dim 16" in diagnosis["skipped"]["kivi4"]
    assert "fp16" not in diagnosis["candidates"] and "naive3" not in diagnosis["candidates"]
    row = diagnosis["layers"][0]
    assert set(row["errors"]["presets"]) == set(diagnosis["candidates"])
    assert row["mode"] in ("Mode 1", "Mode 2", "both", "benign")
    assert len(row["errors"]["keys"]["ptok>int4"]["heads"]) == 2
    (width, best), = diagnosis["summary"]["best"].items()
    assert width == "4" and best in diagnosis["candidates"]
    assert set(row["best"]["keys"]) == {"4"} and row["best"]["keys"]["4"] in row["errors"]["keys"]
    # one fp16 scale per token of head_dim 16: 4 + 16/16 bits
    assert diagnosis["bits"]["keys"]["ptok>int4"] == pytest.approx(5.0)
    json.dumps(diagnosis)


def test_report_and_heatmap(diagnosis, tmp_path):
    from kvq.eval.diagnose.heatmap import write_png
    from kvq.eval.diagnose.report import markdown, write

    text = markdown(diagnosis)
    assert "Best overall" in text and "| 1 |" in text
    paths = write(diagnosis, tmp_path)
    assert json.loads(paths[0].read_text())["layers"][1]["layer"] == 1
    assert write_png(diagnosis, tmp_path / "d.png").stat().st_size > 10_000


def test_cli(tiny_dir, text_file, tmp_path, capsys):
    from kvq.cli.main import main

    out = tmp_path / "diag"
    rc = main(["diagnose", "--model", str(tiny_dir), "--corpus", str(text_file), "--context",
               "64", "--block", "16", "--queries", "8", "--stress", "scale=4,layers=1",
               "--out", str(out), "--quiet", "--no-plot"])
    assert rc == 0
    result = json.loads((out / "diagnose.json").read_text())
    assert result["stress"]["layers"]["1"]
    assert "stress scale=4,layers=1,pairs=4" in capsys.readouterr().out
    for bad in (["--stress", "bogus"], ["--context", "16"], ["--bits", "5"]):
        assert main(["diagnose", "--model", str(tiny_dir), "--quiet", *bad]) == 2
        assert capsys.readouterr().err.count("\n") == 1
