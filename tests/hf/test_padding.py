"""Pad positions stay out of token-axis statistics."""

from __future__ import annotations

import torch
import transformers as tf
from hf_models import left_padded

import kvq
from kvq.hf import KVQCache, cache_kwargs
from kvq.hf.padding import fill_pads

CFG = tf.LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2,
                     num_key_value_heads=2, intermediate_size=64, vocab_size=64)  # head_dim 32


def rt(spec, x):
    p = kvq.build(spec)
    return p.dequantize(p.quantize(x))


def test_fill_pads_copies_a_real_row_of_the_same_group():
    x = torch.randn(1, 2, 1, 8, 4)
    valid = torch.tensor([[[False, True, True, False, False, False, True, False]]])
    out = fill_pads(x, valid, unit=4)
    assert torch.equal(out[..., [1, 2, 6], :], x[..., [1, 2, 6], :])  # real rows untouched
    assert torch.equal(out[..., 0, :], x[..., 1, :]) and torch.equal(out[..., 3, :], x[..., 1, :])
    assert torch.equal(out[..., 4, :], x[..., 6, :]) and torch.equal(out[..., 7, :], x[..., 6, :])
    none = torch.zeros(1, 1, 8, dtype=torch.bool)
    assert torch.equal(fill_pads(x, none, unit=8), x)  # nothing real: left as it is


def padded_kv(pads: int, t: int = 16):
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, t, 32, generator=g), torch.randn(2, 2, t, 32, generator=g)
    k[1, :, :pads] *= 100  # pad positions with wild K (what pad embeddings can give)
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, :pads] = 0
    return k, v, mask


def test_padding_mask_keeps_pads_out_of_per_channel_scales():
    spec = "nsep>pchan>int4"
    k, v, mask = padded_kv(pads=5)
    real = k[1:, :, 5:]
    cache = KVQCache(spec, CFG, block=16)
    cache.set_padding(mask)
    out_k, _ = cache.update(k, v, 0)
    assert torch.equal(out_k[1:, :, 5:], rt(spec, real))  # as if the pads were not there
    assert torch.equal(out_k[:1], rt(spec, k[:1]))  # the unpadded row as usual


def test_without_the_mask_pads_blow_up_per_channel_scales():
    spec = "pchan>int4"
    k, v, mask = padded_kv(pads=5)
    real = k[1:, :, 5:]

    def err(cache):
        y = cache.update(k, v, 0)[0]
        return ((y[1:, :, 5:] - real).norm() / real.norm()).item()

    masked = KVQCache(spec, CFG, block=16)
    masked.set_padding(mask)
    assert err(KVQCache(spec, CFG, block=16)) > 10 * err(masked)


def test_padding_mask_with_token_groups_and_asymmetric_scales():
    spec = "group(4,token)>int4(asym)"
    k, v, mask = padded_kv(pads=3)
    cache = KVQCache(spec, CFG, block=8, residual=0)
    cache.set_padding(mask)
    out_k, _ = cache.update(k, v, 0)
    # token group 0 of row 1 is 3 pads + token 3: its statistics come from token 3 alone
    alone = rt(spec, k[1:, :, 3:4].expand(1, 2, 4, 32).contiguous())[:, :, :1]
    assert torch.equal(out_k[1:, :, 3:4], alone)
    assert torch.equal(out_k[1:, :, 4:8], rt(spec, k[1:, :, 4:8]))


def test_set_padding_rejects_a_4d_mask():
    cache = KVQCache("nsep>pchan>int4", CFG)
    try:
        cache.set_padding(torch.ones(1, 1, 4, 4))
    except kvq.KVQError as err:
        assert "2D" in str(err)
    else:
        raise AssertionError("no error")


def test_watch_reads_the_mask_generate_passes(llama):
    ids, mask = left_padded(pads=(0, 6))
    opts = dict(residual=2, block=4)
    watched = KVQCache("nsep>pchan>int4", llama.config, **opts)
    with watched.watch(llama):
        a = llama.generate(ids, attention_mask=mask, **cache_kwargs(llama, watched),
                           max_new_tokens=6, do_sample=False)
    assert torch.equal(watched.layers[0]._valid[:, :20], mask.bool())
    explicit = KVQCache("nsep>pchan>int4", llama.config, **opts)
    explicit.set_padding(mask)
    b = llama.generate(ids, attention_mask=mask, **cache_kwargs(llama, explicit), max_new_tokens=6,
                       do_sample=False)
    assert torch.equal(a, b)
    assert not llama._forward_pre_hooks  # the hook is gone


def test_padding_mask_follows_beam_expansion(llama):
    ids, mask = left_padded(pads=(0, 6))
    cache = KVQCache("nsep>pchan>int4", llama.config, residual=2, block=4)
    cache.set_padding(mask)  # batch 2; generate expands it to 2 x 3 beams
    out = llama.generate(ids, attention_mask=mask, **cache_kwargs(llama, cache), max_new_tokens=5,
                         num_beams=3, do_sample=False)
    assert out.shape == (2, 25) and cache.layers[0]._valid.shape[0] == 6
