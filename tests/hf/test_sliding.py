"""Sliding-window layers hold their window only, with DynamicSlidingWindowLayer's semantics.

A Gemma-3-like model (3 sliding layers with window 8 and their local rotary, 1 full layer) and a
Mistral-like one (every layer slides over 10 tokens) run prompts longer than the window and decode
well past it. With the identity pipeline the logits must equal those of transformers'
``DynamicCache(config=...)`` exactly, while each sliding layer holds at most the newest
``window - 1`` tokens plus one partly visible block, and its bytes stop growing.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import VOCAB, left_padded, sliding_configs, tiny_model
from transformers import DynamicCache

import kvq
from kvq.errors import KVQError
from kvq.hf import KVQCache, cache_kwargs
from kvq.hf.attention import register

MODELS = list(sliding_configs())
PRE_ID = kvq.KVConfig.from_dict({"keys": {"rope": "pre", "pipeline": "fp16"}, "values": "fp16"})


def tokens(batch, seq, seed):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def sliding(cache):
    return [layer for layer in cache.layers if layer.is_sliding]


def check_window(cache, block, step=0):
    """Every sliding layer holds what the next query sees and at most one block more (``step``
    more after a fast decode step: its attention reads the blocks after ``update`` returned, so
    the step's own window is dropped at the next write)."""
    for layer in sliding(cache):
        seen, w = layer.get_seq_length(), layer.sliding_window
        assert min(seen, w - 1) <= layer.held <= w - 1 + block - 1 + step, (layer.held, seen)
        assert layer.dropped == seen - layer.held


@torch.no_grad()
def run_steps(model, cache, ids, steps, seed=7, mask=None):
    """Prefill ``ids`` then ``steps`` one-token forwards; logits of each forward, last position."""
    kw = cache_kwargs(model, cache)
    out = [model(ids, attention_mask=mask, **kw).logits[:, -1]]
    new = tokens(ids.shape[0], steps, seed)
    for i in range(steps):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out.append(model(new[:, i:i + 1], attention_mask=mask, **kw).logits[:, -1])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("opts", [
    dict(residual=3, block=4),
    dict(residual=3, block=4, prefill="exact"),
    dict(residual=0, block=1),
    dict(residual=40, block=4),          # the exact window is larger than the sliding window
    dict(residual=2, block=4, sinks=1),  # the sink leaves the window too
], ids=["quantized", "exact", "per-token", "wide-residual", "sink"])
def test_identity_equals_dynamic_cache_and_holds_the_window(name, opts):
    model = tiny_model(name)
    cfg = model.config
    w = cfg.sliding_window
    ref, cache = DynamicCache(config=cfg), KVQCache("fp16", cfg, **opts)
    ids = tokens(2, 2 * w + 3, seed=1)
    kw_ref, kw = cache_kwargs(model, ref), cache_kwargs(model, cache)
    new = tokens(2, w + 5, seed=2)
    with torch.no_grad():
        assert torch.equal(model(ids, **kw).logits, model(ids, **kw_ref).logits)
        check_window(cache, opts["block"])
        for i in range(new.shape[1]):
            got = model(new[:, i:i + 1], **kw).logits
            assert torch.equal(got, model(new[:, i:i + 1], **kw_ref).logits), f"step {i}"
            check_window(cache, opts["block"])
            for mine, theirs in zip(cache.layers, ref.layers):
                assert mine.get_seq_length() == theirs.get_seq_length()
                assert mine.get_mask_sizes(1) == theirs.get_mask_sizes(1)
                # identity blocks hold the K/V themselves: bytes are exactly the tokens held
                per_token = 2 * mine.keys.shape[0] * mine.keys.shape[1] * mine.keys.shape[3] * 4
                assert mine.nbytes - mine.sink_store.nbytes == mine.held * per_token
    full = [layer for layer in cache.layers if not layer.is_sliding]
    assert all(layer.held == 2 * w + 3 + w + 5 for layer in full)


@pytest.mark.parametrize("name", MODELS)
def test_quantized_memory_stops_growing(name):
    model = tiny_model(name)
    w = model.config.sliding_window
    cache = KVQCache("nsep>pchan>int4", model.config, residual=3, block=4)
    kw = cache_kwargs(model, cache)
    new = tokens(2, 4 * w, seed=3)
    sizes = []
    with torch.no_grad():
        model(tokens(2, 3 * w, seed=1), **kw)
        for i in range(new.shape[1]):
            model(new[:, i:i + 1], **kw)
            check_window(cache, 4)
            sizes.append([layer.nbytes for layer in sliding(cache)])
    early, late = torch.tensor(sizes[:2 * w]), torch.tensor(sizes[2 * w:])
    assert (late.max(dim=0).values <= early.max(dim=0).values).all(), "sliding layers grew"
    report = cache.memory_report()
    for row, layer in zip(report.layers, cache.layers):
        assert row.quantized_tokens + row.residual_tokens == layer.held
        assert row.total_bytes == layer.nbytes


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("prefill", ["quantized", "exact"])
def test_generate_beams_and_left_padding_equal_dynamic_cache(name, prefill):
    model = tiny_model(name)
    cfg = model.config
    ids, mask = left_padded(batch=3, seq=13, pads=(0, 4, 9))
    cases = {"greedy": dict(attention_mask=mask, do_sample=False),
             "beam": dict(attention_mask=mask, num_beams=3, do_sample=False)}
    for case, kw in cases.items():
        outs = []
        for cache in (DynamicCache(config=cfg),
                      KVQCache("fp16", cfg, residual=2, block=4, prefill=prefill)):
            out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=10,
                                 min_new_tokens=10, output_scores=True,
                                 return_dict_in_generate=True, **kw)
            outs.append((out.sequences, torch.stack(out.scores)))
        check_window(cache, 4)
        assert torch.equal(outs[0][0], outs[1][0]), f"{name} {case}: tokens differ"
        assert torch.equal(outs[0][1], outs[1][1]), f"{name} {case}: scores differ"


@pytest.mark.parametrize("name", MODELS)
def test_crop_with_past_recording_equals_dynamic_cache(name):
    model = tiny_model(name)
    cfg = model.config
    w = cfg.sliding_window
    ref, cache = DynamicCache(config=cfg), KVQCache("fp16", cfg, residual=3, block=4)
    with torch.no_grad():
        for c in (ref, cache):
            model(tokens(2, 2 * w, seed=1), **cache_kwargs(model, c))
            c.activate_past_recording()  # as assisted decoding does, to roll back
            for i in range(5):
                model(tokens(2, 1, seed=10 + i), **cache_kwargs(model, c))
        held = max(layer.held for layer in sliding(cache))
        assert held >= w - 1 + 5  # recording: nothing dropped since
        for c in (ref, cache):
            c.crop(-3)
        assert cache.get_seq_length() == ref.get_seq_length() == 2 * w + 2
        check_window(cache, 4)
        for c in (ref, cache):
            for layer in c.layers:
                layer.record_past = False
        outs = [run_steps(model, c, tokens(2, 2, seed=30), w) for c in (ref, cache)]
    assert torch.equal(outs[0], outs[1])
    check_window(cache, 4)


def test_crop_of_dropped_tokens_is_refused():
    model = tiny_model("gemma3_sliding")
    cache = KVQCache("fp16", model.config, residual=3, block=4)
    with torch.no_grad():
        model(tokens(1, 20, seed=1), **cache_kwargs(model, cache))
        for i in range(6):
            model(tokens(1, 1, seed=10 + i), **cache_kwargs(model, cache))
    with pytest.raises(KVQError, match="activate_past_recording"):
        cache.crop(-5)
    cache.crop(0)  # only restricts to the window
    assert cache.get_seq_length() == 26
    check_window(cache, 4)


@pytest.mark.parametrize("name", MODELS)
def test_pre_rope_keys_through_the_window(name):
    model = tiny_model(name)
    ids, mask = left_padded(batch=2, seq=21, pads=(0, 6))
    ref = run_steps(model, DynamicCache(config=model.config), ids, 14, mask=mask)
    cache = KVQCache(PRE_ID, model, residual=3, block=4)
    got = run_steps(model, cache, ids, 14, mask=mask)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    check_window(cache, 4)


def _set(model, name):
    register()
    model.set_attn_implementation(name)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("prefill,residual,factors", [("quantized", 3, "recompute"),
                                                      ("exact", 0, "recompute"),
                                                      ("quantized", 1, "store")])
def test_fast_decode_equals_general_past_the_window(name, prefill, residual, factors,
                                                    count_fast):
    model = tiny_model(name)
    ids, mask = left_padded(batch=2, seq=3 * model.config.sliding_window, pads=(0, 5))
    opts = dict(residual=residual, block=4, prefill=prefill, factors=factors)
    outs = []
    for impl, attention in (("sdpa", "dequantize"), ("kvq", "fast")):
        _set(model, impl)
        try:
            cache = KVQCache("nsep>pchan>int4", model.config, attention=attention, **opts)
            outs.append(run_steps(model, cache, ids, 20, mask=mask))
            if attention == "fast" and factors == "store":  # blocks dropped with their factors
                segs = [s for la in sliding(cache) for s in la.k_store.segments]
                assert segs and all(s.extra for s in segs[1:])
        finally:
            _set(model, "sdpa")
        check_window(cache, 4, step=1)
    assert len(count_fast) == 20 * model.config.num_hidden_layers
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_fast_decode_with_pre_rope_keys_past_the_window(name, count_fast):
    """Pre-RoPE keys on the fast path: each held chunk is rotated for its absolute positions,
    which start ``layer.dropped`` tokens in once the window has moved (Gemma 3: per layer type)."""
    model = tiny_model(name)
    ids, mask = left_padded(batch=2, seq=3 * model.config.sliding_window, pads=(0, 5))
    cfg = kvq.KVConfig.from_dict({"keys": {"rope": "pre", "pipeline": "nsep>pchan>int4"},
                                  "values": "nsep>pchan>int4", "sinks": 1})
    outs = []
    for impl, attention in (("sdpa", "dequantize"), ("kvq", "fast")):
        _set(model, impl)
        try:
            cache = KVQCache(cfg, model, residual=3, block=4, attention=attention)
            outs.append(run_steps(model, cache, ids, 20, mask=mask))
        finally:
            _set(model, "sdpa")
        assert any(la.dropped for la in sliding(cache))
    assert len(count_fast) == 20 * model.config.num_hidden_layers
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", [*MODELS, "llama"])
@pytest.mark.parametrize("seen", [5, 30])
def test_compare_counts_what_dynamic_cache_holds(name, seen):
    """kvq compare's fp16 reference is what DynamicCache(config=...) really holds, at 2 bytes."""
    from kvq.eval.caches import fp16_bytes
    from kvq.hf.geometry import kv_geometry

    cfg = tiny_model(name).config
    geom = kv_geometry(cfg)
    ref = DynamicCache(config=cfg)
    kv = torch.zeros(1, geom.kv_heads, seen, geom.head_dim)
    for i in range(geom.num_layers):
        ref.update(kv, kv, i)
    held = sum(layer.keys.numel() + layer.values.numel() for layer in ref.layers)
    assert fp16_bytes(cfg, seen) == 2 * held


@pytest.mark.parametrize("name", MODELS)
def test_assisted_decoding_rolls_back_like_dynamic_cache(name):
    """Prompt-lookup decoding (transformers' assisted generation) records the past, then crops
    rejected draft tokens after every step: the same tokens as DynamicCache."""
    model = tiny_model(name)
    ids = torch.randint(3, 20, (1, 30), generator=torch.Generator().manual_seed(3))  # repeats
    outs = []
    for cache in (DynamicCache(config=model.config), KVQCache("fp16", model.config, residual=3,
                                                              block=4)):
        outs.append(model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=20,
                                   min_new_tokens=20, do_sample=False,
                                   prompt_lookup_num_tokens=3))
    assert torch.equal(outs[0], outs[1])
    assert cache.get_seq_length() == 49
    check_window(cache, 4)
