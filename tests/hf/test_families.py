"""Every model family: identity pipeline == DynamicCache exactly; int4 pipeline runs and is close.

For each family: forward, greedy ``generate``, beam search and a left-padded batch. With the
``fp16`` preset (quantizer ``none``) the tokens and scores must equal those of transformers' own
``DynamicCache``; with ``nsep>pchan>int4`` (small residual window and blocks, so decode tokens are
flushed and quantized during the test) the forward stays close to the exact one.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import VOCAB, family_configs, left_padded, tiny_model
from transformers import DynamicCache

from kvq.hf import KVQCache, cache_kwargs

FAMILIES = list(family_configs())
OPTS = dict(residual=3, block=4)
INT4 = dict(residual=1, block=4)  # 5 decode tokens written: one block flushes


def generate(model, ids, cache, **kw):
    out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=6, min_new_tokens=6,
                         output_scores=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores)


def ids_for(batch=2, seq=13):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family,prefill", [(f, "quantized") for f in FAMILIES]
                         + [("llama", "exact"), ("gpt2", "exact")])
def test_identity_pipeline_equals_dynamic_cache(family, prefill):
    model = tiny_model(family)
    cfg = model.config
    ids, mask = left_padded(pads=(0, 4), seq=13)
    cases = {
        "greedy": (ids_for(), dict(do_sample=False)),
        "beam": (ids_for(), dict(num_beams=3, do_sample=False)),
        "padded": (ids, dict(attention_mask=mask, do_sample=False)),
    }
    for name, (inp, kw) in cases.items():
        ref = generate(model, inp, DynamicCache(config=cfg), **kw)
        got = generate(model, inp, KVQCache("fp16", cfg, prefill=prefill, **OPTS), **kw)
        assert torch.equal(got[0], ref[0]), f"{family} {name}: tokens differ"
        assert torch.equal(got[1], ref[1]), f"{family} {name}: scores differ"


def test_identity_pipeline_equals_dynamic_cache_when_sampling():
    model = tiny_model("llama")
    outs = []
    for cache in (DynamicCache(config=model.config), KVQCache("fp16", model.config, **OPTS)):
        torch.manual_seed(123)
        outs.append(generate(model, ids_for(), cache, do_sample=True, top_k=20))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("family", FAMILIES)
def test_int4_cache_forward_generate_beam_padded(family):
    model = tiny_model(family)
    cfg = model.config
    ids = ids_for(seq=16)
    with torch.no_grad():
        exact = model(ids).logits
        cache = KVQCache("nsep>pchan>int4", cfg, **INT4)
        logits = model(ids, **cache_kwargs(model, cache)).logits
    assert cache.get_seq_length() == 16
    rel = ((logits - exact).norm() / exact.norm()).item()
    assert 0 < rel < 0.2, f"{family}: relative logit error {rel:.3f}"

    cache = KVQCache("nsep>pchan>int4", cfg, **INT4)
    seq, scores = generate(model, ids, cache, do_sample=False)
    assert seq.shape == (2, 22) and not torch.isnan(scores).any()
    report = cache.memory_report().total
    first = cache.layers[0]
    if first.is_sliding and first.get_seq_length() >= first.sliding_window:  # Mistral: 12
        assert report.quantized_tokens + report.residual_tokens == first.held < 21
    else:
        assert report.quantized_tokens == 16 + 4  # prompt + one flushed block of decode tokens
        assert report.residual_tokens == 1

    seq, _ = generate(model, ids, KVQCache("nsep>pchan>int4", cfg, **INT4), num_beams=2)
    assert seq.shape == (2, 22)

    pids, mask = left_padded(pads=(0, 5), seq=16)
    cache = KVQCache("nsep>pchan>int4", cfg, **INT4)
    with cache.watch(model):
        seq, scores = generate(model, pids, cache, attention_mask=mask, do_sample=False)
    assert seq.shape == (2, 22) and not torch.isnan(scores).any()


def test_mistral_sliding_window_beyond_the_window():
    """Sliding-window layers keep every token; the model's sliding mask hides the old ones."""
    model = tiny_model("mistral")
    assert model.config.sliding_window == 12
    ids = ids_for(seq=10)
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)  # 30 tokens > window
    ref = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **kw)
    got = model.generate(ids, **cache_kwargs(model, KVQCache("fp16", model.config, **OPTS)),
                         **kw)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_keep_dequantized_generates_the_same(family):
    model = tiny_model(family)
    ids, mask = left_padded(pads=(0, 3), seq=14)
    outs = []
    for keep in (False, True):
        cache = KVQCache("nsep>pchan>int4", model.config, keep_dequantized=keep, **INT4)
        cache.set_padding(mask)
        outs.append(generate(model, ids, cache, attention_mask=mask, num_beams=2))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
