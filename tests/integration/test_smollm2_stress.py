"""Outlier stress on the real SmolLM2-135M: same function, Qwen2-7B-like key outliers.

Slow: ``pytest -m slow tests/integration/test_smollm2_stress.py``. Skips without the model.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

pytestmark = pytest.mark.slow

TEXT = ("Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. "
        "The evil that men do lives after them; the good is oft interred with their bones.")


def test_default_stress_preserves_logits_and_plants_outliers():
    from kvq.errors import KVQError
    from kvq.eval.diagnose.stats import head_stats
    from kvq.eval.models import load
    from kvq.eval.stress import apply_stress

    try:
        model, tokenizer = load()
    except (KVQError, OSError, ImportError) as err:
        pytest.skip(f"SmolLM2-135M is not available: {err}")
    ids = tokenizer(TEXT, return_tensors="pt").input_ids

    def run():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            logits = model(ids, past_key_values=cache, use_cache=True).logits
        return logits, [head_stats(layer.keys)["outlier_ratio"] for layer in cache.layers]

    before, ratio0 = run()
    report = apply_stress(model)  # default: scale 16, layers 0-3, 4 RoPE pairs per KV head
    after, ratio1 = run()
    assert (after - before).abs().max().item() <= 1e-3
    assert set(report["layers"]) == {0, 1, 2, 3}
    for layer in range(4):
        assert min(ratio1[layer]) > 15 > 8 > max(ratio0[layer])  # Qwen2-7B layer 0: 8-100x
    assert ratio1[10] == pytest.approx(ratio0[10], rel=1e-4)
