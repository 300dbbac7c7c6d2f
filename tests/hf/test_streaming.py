"""KVQLayer streaming: residual window, block flushes, prefill modes, never re-quantizing."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import kvq
from kvq.hf import KVQCache
from kvq.pipeline import Pipeline

SPEC = "nsep>pchan>int4"
CFG = tf.LlamaConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2,
                     num_key_value_heads=2, intermediate_size=64, vocab_size=64)  # head_dim 64


def kv(b=1, t=1, seed=0, h=2, d=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)


def roundtrip(x, spec=SPEC):
    p = kvq.build(spec)
    return p.dequantize(p.quantize(x))


def test_decode_tokens_quantized_when_their_block_flushes():
    cache = KVQCache(SPEC, CFG, residual=4, block=8)
    layer = cache.layers[0]
    k0, v0 = kv(t=16, seed=1)
    cache.update(k0, v0, 0)
    assert layer.memory()["quantized_tokens"] == 16 and layer.memory()["residual_tokens"] == 0
    decoded = []
    for i in range(12):
        k, v = kv(seed=10 + i)
        decoded.append((k, v))
        out_k, out_v = cache.update(k, v, 0)
        m = layer.memory()
        if i < 11:  # window holds i + 1 < residual + block tokens: all exact
            assert (m["quantized_tokens"], m["residual_tokens"]) == (16, i + 1)
            assert torch.equal(out_k[:, :, 16:], torch.cat([d[0] for d in decoded], dim=-2))
    # the 12th token fills residual + block: the oldest 8 decode tokens are now one quantized block
    assert (m["quantized_tokens"], m["residual_tokens"]) == (24, 4)
    block_k = torch.cat([d[0] for d in decoded[:8]], dim=-2)
    block_v = torch.cat([d[1] for d in decoded[:8]], dim=-2)
    assert not torch.equal(out_k[:, :, 16:24], block_k)
    torch.testing.assert_close(out_k[:, :, 16:24], roundtrip(block_k), rtol=0, atol=0)
    torch.testing.assert_close(out_v[:, :, 16:24], roundtrip(block_v), rtol=0, atol=0)
    assert torch.equal(out_k[:, :, 24:], torch.cat([d[0] for d in decoded[8:]], dim=-2))
    assert cache.get_seq_length() == 28


def test_quantized_blocks_are_never_quantized_again(monkeypatch):
    seen = []
    real = Pipeline.quantize

    def spy(self, x, backend="auto"):
        seen.append(x.shape[-3] * x.shape[-2])  # heads*blocks * tokens per block, per stream
        return real(self, x, backend)

    monkeypatch.setattr(Pipeline, "quantize", spy)
    cache = KVQCache(SPEC, CFG, residual=3, block=4)
    cache.update(*kv(t=10), 0)
    first = cache.layers[0].k_store.segments[0].q.codes.clone()
    for i in range(40):
        cache.update(*kv(seed=i + 1), 0)
    quantized = cache.layers[0].memory()["quantized_tokens"]
    assert sum(seen) == 2 * 2 * quantized  # K and V, 2 heads: each token exactly once
    assert torch.equal(cache.layers[0].k_store.segments[0].q.codes, first)


def test_quantized_prefill_attention_sees_dequantized_blocks():
    cache = KVQCache(SPEC, CFG, prefill="quantized", residual=128, block=8)
    k, v = kv(t=20)
    out_k, out_v = cache.update(k, v, 0)
    expect = torch.cat([roundtrip(k[:, :, :8]), roundtrip(k[:, :, 8:16]), roundtrip(k[:, :, 16:])],
                       dim=-2)
    torch.testing.assert_close(out_k, expect, rtol=0, atol=0)
    assert cache.layers[0].memory()["quantized_tokens"] == 20  # the residual starts empty


def test_exact_prefill_returns_exact_kv_and_keeps_a_window():
    cache = KVQCache(SPEC, CFG, prefill="exact", residual=6, block=4)
    k, v = kv(t=21)
    out_k, out_v = cache.update(k, v, 0)
    assert torch.equal(out_k, k) and torch.equal(out_v, v)
    m = cache.layers[0].memory()
    assert (m["quantized_tokens"], m["residual_tokens"]) == (12, 9)  # 9 < residual + block
    k1, v1 = kv(seed=5)
    out_k, _ = cache.update(k1, v1, 0)
    torch.testing.assert_close(out_k[:, :, :4], roundtrip(k[:, :, :4]), rtol=0, atol=0)
    # the window reached residual + block = 10 tokens: 4 more (12..15) were quantized
    torch.testing.assert_close(out_k[:, :, 12:16], roundtrip(k[:, :, 12:16]), rtol=0, atol=0)
    assert torch.equal(out_k[:, :, 16:21], k[:, :, 16:]) and torch.equal(out_k[:, :, 21:], k1)


def test_prefill_tail_of_one_token_joins_last_block_for_token_statistics():
    cache = KVQCache(SPEC, CFG, block=8)
    k, v = kv(t=17)
    out_k, _ = cache.update(k, v, 0)
    assert [s.block for s in cache.layers[0].k_store.segments] == [8, 9]
    torch.testing.assert_close(out_k[:, :, 8:], roundtrip(k[:, :, 8:]), rtol=0, atol=0)
    one = KVQCache(SPEC, CFG, block=8)
    k1, v1 = kv(t=1)
    assert torch.equal(one.update(k1, v1, 0)[0], k1)  # no statistic over one token: kept exact
    assert one.layers[0].memory()["residual_tokens"] == 1


def test_per_token_pipeline_can_quantize_every_token_on_arrival():
    cache = KVQCache("ptok>int4", CFG, residual=0, block=1)
    cache.update(*kv(t=5), 0)
    for i in range(3):
        k, v = kv(seed=i + 1)
        out_k, _ = cache.update(k, v, 0)
        torch.testing.assert_close(out_k[:, :, -1:], roundtrip(k, "ptok>int4"), rtol=0, atol=0)
    assert cache.layers[0].memory()["residual_tokens"] == 0


@pytest.mark.parametrize("prefill", ["quantized", "exact"])
def test_keep_dequantized_gives_the_same_kv(prefill):
    caches = [KVQCache(SPEC, CFG, prefill=prefill, residual=3, block=4, keep_dequantized=keep)
              for keep in (False, True)]
    for step in range(12):
        k, v = kv(b=2, t=9 if step == 0 else 1, seed=step)
        a, b = (c.update(k, v, 1) for c in caches)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert caches[1].layers[1].memory()["working_bytes"] > 0


def test_crop_inside_quantized_blocks_keeps_the_rest_unchanged():
    cache = KVQCache(SPEC, CFG, residual=2, block=4)
    cache.update(*kv(t=10), 0)
    for i in range(6):
        before_k, _ = cache.update(*kv(seed=i + 1), 0)
    n = cache.get_seq_length()
    cache.crop(-5)  # the 2 residual tokens and 3 quantized ones
    assert cache.get_seq_length() == n - 5
    k, v = kv(seed=99)
    out_k, _ = cache.update(k, v, 0)
    assert torch.equal(out_k[:, :, :n - 5], before_k[:, :, :n - 5])
    assert torch.equal(out_k[:, :, -1:], k)
    with pytest.raises(kvq.KVQError, match="negative"):
        cache.crop(3)


def test_batch_ops_follow_the_quantized_blocks():
    cache = KVQCache(SPEC, CFG, residual=2, block=4)
    k, v = kv(b=3, t=11)
    cache.update(k, v, 0)
    step = kv(b=3, seed=1)
    full_k, full_v = cache.update(*step, 0)
    idx = torch.tensor([2, 0, 1])
    cache.reorder_cache(idx)
    k2, v2 = kv(b=3, seed=2)
    out_k, out_v = cache.update(k2, v2, 0)
    assert torch.equal(out_k[:, :, :-1], full_k[idx]) and torch.equal(out_v[:, :, -1:], v2)
    cache.batch_repeat_interleave(2)
    out_k, _ = cache.update(*kv(b=6, seed=3), 0)
    assert out_k.shape[0] == 6 and torch.equal(out_k[0, :, :13], out_k[1, :, :13])
    cache.batch_select_indices(torch.tensor([0, 5]))
    out_k, _ = cache.update(*kv(b=2, seed=4), 0)
    assert out_k.shape[:3] == (2, 2, 15)


def test_lengths_masks_reset_and_bytes():
    cache = KVQCache(SPEC, CFG, residual=8, block=32)
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
    cache.update(*kv(t=64), 0)
    cache.update(*kv(t=64), 1)
    assert cache.get_seq_length() == 64 and cache.get_mask_sizes(1, 0) == (65, 0)
    report = cache.memory_report()
    # nsep>pchan>int4, head_dim 64, blocks of 32: 4 code bits + 16/64 norm + 16/32 scale = 4.75
    assert report.total.bits_per_element == pytest.approx(4.75)
    assert report.total.quantized_ratio <= 0.30
    assert report.total.quantized_bytes == 2 * 2 * (1 * 2 * 64 * 64 * 4.75 / 8)
    assert cache.nbytes == report.total.total_bytes == report.total.quantized_bytes
    assert "total" in str(report) and report.as_dict()["layers"][0]["layer"] == 0
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
    cache.update(*kv(t=3), 0)
    assert cache.get_seq_length() == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kv_come_back_in_their_dtype(dtype):
    cache = KVQCache(SPEC, CFG, residual=2, block=4, keep_dequantized=True)
    k, v = (t.to(dtype) for t in kv(t=9))
    out_k, out_v = cache.update(k, v, 0)
    assert out_k.dtype == out_v.dtype == dtype and out_k.shape == k.shape
    out_k, _ = cache.update(*(t.to(dtype) for t in kv(seed=3)), 0)
    assert out_k.dtype == dtype and out_k.shape[-2] == 10
    assert cache.memory_report().total.residual_bytes == 2 * 2 * 64 * 1 * 2  # 1 token, 2 bytes
