"""Transform coding on the real SmolLM2-135M-Instruct (slow; skips without the model or corpus):
a small calibration on the training split beats the best uncalibrated format at fewer bits."""

from __future__ import annotations

import pytest
import torch
from test_smollm2_cache import smollm2  # noqa: F401  (fixture)

import kvq
from kvq.hf import KVQCache

pytestmark = pytest.mark.slow


def test_tc3_beats_quarot3_at_fewer_bits(smollm2, tmp_path):  # noqa: F811
    from kvq.errors import KVQError
    from kvq.eval import corpus as corpora
    from kvq.eval.calibrate import calibrate
    from kvq.eval.models import load

    model, tokenizer = load()
    try:
        cfg = calibrate("tc3", tmp_path / "tc3.yaml", progress=False, loaded=(model, tokenizer),
                        tokens=2048, sensitivity="none")
        text = corpora.load_documents("shakespeare")
    except (KVQError, OSError) as err:
        pytest.skip(f"the Shakespeare corpus is not available: {err}")
    ids = corpora.token_ids(tokenizer, text)[None, :1024]

    def nll(config) -> float:
        cache = KVQCache(config, model, prefill="quantized")
        with torch.no_grad():
            out = model(ids, **kvq.hf.cache_kwargs(model, cache), use_cache=True)
        return torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:]).item(), cache

    exact, _ = nll(kvq.kv("fp16"))
    tc, cache = nll(cfg)
    quarot, qcache = nll(kvq.kv("quarot3"))
    assert cache.nbytes < qcache.nbytes  # 3.27 (+ the sink) against 3.5 bits/element
    assert exact < tc < exact + 0.5 * (quarot - exact), (exact, tc, quarot)
