"""The packed-K/V decode attention on the real SmolLM2-135M-Instruct (30 layers, 3 KV heads).

Slow: ``pytest -m slow tests/integration/test_smollm2_fast_decode.py``. Skips when the model is
unavailable. The fast path (nsep factors recomputed or stored) must give the general path's
logits step by step, to fp32 rounding, on a prompt of several blocks with decode flushes.
"""

from __future__ import annotations

import pytest
import torch
from test_smollm2_cache import smollm2  # noqa: F401 - module fixture

from kvq.hf import KVQCache, enable_fast_attention
from kvq.hf.compat import cache_kwargs

pytestmark = pytest.mark.slow


@torch.no_grad()
def _logits(model, cache, ids, steps: int) -> torch.Tensor:
    kw = cache_kwargs(model, cache)
    out = model(ids, use_cache=True, **kw)
    got = [out.logits[:, -1]]
    for _ in range(steps):
        out = model(got[-1].argmax(-1, keepdim=True), use_cache=True, **kw)
        got.append(out.logits[:, -1])
    return torch.stack(got, dim=1)


def test_fast_decode_equals_the_general_path(smollm2, monkeypatch):  # noqa: F811 - fixture
    import kvq.hf.flash_decode as flash_decode

    calls, orig = [], flash_decode.decode_attention
    monkeypatch.setattr(flash_decode, "decode_attention",
                        lambda *a, **k: calls.append(1) or orig(*a, **k))
    model, ids = smollm2
    opts = dict(residual=4, block=8)  # decode flushes a block every 8 steps
    ref = _logits(model, KVQCache("nsep>pchan>int4", model.config, attention="dequantize",
                                  **opts), ids, 14)
    enable_fast_attention(model)
    try:
        for factors in ("recompute", "store"):
            cache = KVQCache("nsep>pchan>int4", model.config, attention="fast", factors=factors,
                             **opts)
            got = _logits(model, cache, ids, 14)
            # fp32 rounding through 30 layers, on logits of magnitude ~20: observed 1.3e-4
            torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)
            assert len(cache.layers[0].k_store) > ids.shape[1]  # decode tokens were flushed
            assert len(calls) == 14 * len(cache.layers)  # every decode step, every layer
            calls.clear()
    finally:
        model.set_attn_implementation("sdpa")
