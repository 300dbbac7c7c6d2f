"""Attention sinks in KVQCache (kvq/hf/sinks.py): the first n real tokens of each row stay exact,
out of token statistics, under left padding, beam search (reorder / repeat / select) and crop."""

from __future__ import annotations

import pytest
import torch
from hf_models import left_padded, tiny_model
from transformers import DynamicCache

import kvq
from kvq.errors import KVQError
from kvq.hf import KVQCache


def read(cache, i=0):
    return cache.layers[i]._read()


def exact_keys(model, ids, mask=None, generate_positions=False):
    """A DynamicCache after one forward; ``generate_positions``: with the position ids that
    ``generate`` gives a left-padded batch (real tokens from 0, pads at 1)."""
    ref = DynamicCache(config=model.config)
    pos = None
    if generate_positions:
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=pos, past_key_values=ref)
    return ref


@pytest.mark.parametrize("spec", ["ptok>int2", "pchan>int2"])
def test_first_real_tokens_exact_with_left_padding(spec):
    model = tiny_model("llama")
    ids, mask = left_padded(pads=(0, 5), seq=16)
    ref = exact_keys(model, ids, mask)
    cache = KVQCache(spec, model, sinks=2, residual=0, block=4)  # attached: reads the mask
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    for i, layer in enumerate(ref.layers):
        k, v = read(cache, i)
        for row, first in ((0, 0), (1, 5)):
            sinks = slice(first, first + 2)
            assert torch.equal(k[row, :, sinks], layer.keys[row, :, sinks])
            assert torch.equal(v[row, :, sinks], layer.values[row, :, sinks])
            after = slice(first + 2, None)
            assert not torch.allclose(k[row, :, after], layer.keys[row, :, after], atol=1e-3)
    assert cache.layers[0].sink_store.pos.tolist() == [[0, 1], [5, 6]]
    assert cache.memory_report().total.sink_tokens == 2


def test_sinks_stay_out_of_per_channel_statistics():
    """A huge first token would set every per-channel scale of its block; as a sink it doesn't."""
    cfg = tiny_model("llama").config
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    k[:, :, 0] *= 1000
    errs = {}
    for n in (0, 1):
        cache = KVQCache("pchan>int4", cfg, sinks=n, residual=0, block=8)
        got, _ = cache.update(k, v, 0)
        errs[n] = ((got[:, :, 1:] - k[:, :, 1:]).norm() / k[:, :, 1:].norm()).item()
        assert torch.equal(got[:, :, :n], k[:, :, :n])
    assert errs[1] < 0.2 < 0.9 < errs[0], errs


def test_sinks_follow_beam_reorder_repeat_select_and_crop():
    cfg = tiny_model("llama").config
    torch.manual_seed(1)
    k, v = torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    cache = KVQCache("ptok>int2", cfg, sinks=2, residual=0, block=2)
    cache.set_padding(torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]]))
    cache.update(k, v, 0)
    first = {0: 0, 1: 3}

    def check(rows):
        got_k, got_v = read(cache)
        for out_row, src in enumerate(rows):
            s = slice(first[src], first[src] + 2)
            assert torch.equal(got_k[out_row, :, s], k[src, :, s])
            assert torch.equal(got_v[out_row, :, s], v[src, :, s])

    check([0, 1])
    cache.batch_repeat_interleave(2)
    check([0, 0, 1, 1])
    cache.reorder_cache(torch.tensor([3, 0, 2, 1]))
    check([1, 0, 1, 0])
    cache.batch_select_indices(torch.tensor([1, 2]))
    check([0, 1])
    cache.crop(-2)  # row 1's second sink (position 4) is gone
    assert cache.layers[0].sink_store.pos.tolist() == [[0, 1], [3, -1]]
    k2, v2 = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    got, _ = cache.update(k2, v2, 0)  # position 4 again, now holding new K: a sink again
    assert cache.layers[0].sink_store.pos.tolist() == [[0, 1], [3, 4]]
    assert torch.equal(got[1, :, 4], k2[1, :, 0])


def test_beam_search_with_sinks_and_pre_rope_matches_the_exact_cache():
    """Identity pipelines: sinks and pre-RoPE keys must not change generate, beams included."""
    model = tiny_model("qwen2")
    ids, mask = left_padded(pads=(0, 4), seq=12)
    cfg = kvq.KVConfig.from_dict({"keys": {"rope": "pre", "pipeline": "fp16"}, "values": "fp16",
                                  "sinks": 3})
    kw = dict(attention_mask=mask, num_beams=3, max_new_tokens=6, min_new_tokens=6,
              do_sample=False, output_scores=True, return_dict_in_generate=True)
    ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
    cache = KVQCache(cfg, model, residual=2, block=4)
    got = model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(ref.scores), rtol=1e-4,
                               atol=1e-4)
    assert cache.layers[0].sink_store.pos.shape == (6, 3)


def test_quantized_generate_with_sinks_keeps_them_exact_in_every_beam():
    model = tiny_model("llama")
    ids, mask = left_padded(pads=(0, 3), seq=12)
    cache = KVQCache("pchan>int2", model, sinks=2, residual=1, block=4, keep_dequantized=True)
    model.generate(ids, attention_mask=mask, past_key_values=cache, num_beams=2,
                   max_new_tokens=5, min_new_tokens=5, do_sample=False)
    ref = exact_keys(model, ids, mask, generate_positions=True)  # every beam shares its prompt
    k, v = read(cache)
    for beam_row in range(4):
        row, first = beam_row // 2, (0, 3)[beam_row // 2]
        s = slice(first, first + 2)
        assert torch.equal(k[beam_row, :, s], ref.layers[0].keys[row, :, s])
        assert torch.equal(v[beam_row, :, s], ref.layers[0].values[row, :, s])


def test_memory_report_counts_sinks():
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    sizes = {}
    for n in (0, 4):
        cache = KVQCache("ptok>int4", model, sinks=n, residual=0, block=4)
        with torch.no_grad():
            model(ids, past_key_values=cache)
        sizes[n] = cache.memory_report().total
    exact = 2 * 2 * 2 * 4 * (16 + 16) * 4 + 2 * 2 * 4 * 8  # layers*B*H*n*(D+Dv)*fp32 + positions
    assert sizes[4].sink_bytes == exact and sizes[0].sink_bytes == 0
    assert sizes[4].quantized_bytes == sizes[0].quantized_bytes
    added = 8 * exact / sizes[4].elements_quantized
    assert sizes[4].bits_per_element == pytest.approx(sizes[0].bits_per_element + added)


def test_sinks_option_and_config():
    cfg = tiny_model("llama").config
    assert KVQCache("naive4", cfg).options["sinks"] == 0
    kv = kvq.KVConfig.from_dict({"kv": "ptok>int4", "sinks": 2})
    assert KVQCache(kv, cfg).layers[1].sinks == 2
    assert KVQCache(kv, cfg, sinks=0).layers[1].sinks == 0
    with pytest.raises(KVQError, match="sinks=-1"):
        KVQCache(kv, cfg, sinks=-1)


@pytest.mark.parametrize("bad", [True, 1.0, "2"])
def test_sinks_must_be_a_token_count(bad):
    """A bool is not a token count (like residual=True); floats and strings are refused."""
    with pytest.raises(KVQError, match="sinks=.*expected a number of tokens"):
        KVQCache("ptok>int4", tiny_model("llama").config, sinks=bad)


def test_sinks_are_bounded_by_the_context():
    cfg = tiny_model("llama").config
    limit = cfg.max_position_embeddings
    KVQCache("ptok>int4", cfg, sinks=limit)
    for n in (limit + 1, 10**9):
        with pytest.raises(KVQError, match=f"sinks={n} exceeds the model's context"):
            KVQCache("ptok>int4", cfg, sinks=n)


def test_sink_storage_follows_the_sinks_seen(monkeypatch):
    """sinks=2_000_000 on a 6-token prompt used to allocate the full store (1 GiB) at once."""
    model = tiny_model("llama")
    monkeypatch.setattr(model.config, "max_position_embeddings", 4_000_000)
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    big = KVQCache("ptok>int4", model, sinks=2_000_000, residual=0, block=4)
    small = KVQCache("ptok>int4", model, sinks=6, residual=0, block=4)
    with torch.no_grad():
        out = model(ids, past_key_values=big).logits
        ref = model(ids, past_key_values=small).logits
        step = torch.tensor([[5], [7]])
        out2 = model(step, past_key_values=big).logits
        ref2 = model(step, past_key_values=small).logits
    assert torch.equal(out, ref) and torch.equal(out2, ref2)
    store = big.layers[0].sink_store
    assert store.pos.shape == (2, 7) and store.tokens == 7
    assert big.memory_report().total.sink_bytes == small.memory_report().total.sink_bytes + (
        2 * 2 * 2 * (16 + 16) * 4 + 2 * 2 * 8)  # one more sink per row: layers*B*H*(D+Dv)*fp32
