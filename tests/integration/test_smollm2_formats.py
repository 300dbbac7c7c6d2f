"""The TurboQuant / FP8 / FP4 presets in KVQCache on the real SmolLM2-135M (head_dim 64).

Slow: ``pytest -m slow tests/integration/test_smollm2_formats.py``. Skips without the model.
"""

from __future__ import annotations

import pytest
import torch

from kvq.hf import KVQCache
from kvq.hf.compat import cache_kwargs

pytestmark = pytest.mark.slow

TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all "
        "the clouds that lour'd upon our house in the deep bosom of the ocean buried. Now are "
        "our brows bound with victorious wreaths; our bruised arms hung up for monuments; our "
        "stern alarums changed to merry meetings, our dreadful marches to delightful measures.")


@pytest.fixture(scope="module")
def smollm2():
    from kvq.errors import KVQError
    from kvq.eval.models import load

    try:
        model, tokenizer = load()
    except (KVQError, OSError, ImportError) as err:
        pytest.skip(f"SmolLM2-135M is not available (kvq.eval.models.load failed: {err})")
    return model, tokenizer(TEXT, return_tensors="pt").input_ids


def nll(model, ids, cache=None) -> float:
    with torch.no_grad():
        out = model(ids, **cache_kwargs(model, cache), use_cache=cache is not None)
    return torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:]).item()


def test_frontier_presets_on_the_real_model(smollm2):
    model, ids = smollm2
    exact = nll(model, ids)
    got = {}
    for name in ("fp8", "turboquant4", "nvfp4", "mxfp4", "turboquant3"):
        cache = KVQCache(name, model.config, prefill="quantized")
        got[name] = nll(model, ids, cache)
        if name == "turboquant4":
            report = cache.memory_report()
            plain = [m.layer for m in report.layers if m.elements_quantized and
                     m.quantized_bytes * 8 == 32 * m.elements_quantized]  # fp32 model: as is
            assert plain == [0, 1, 28, 29]  # vLLM's boundary layers stay unquantized
            assert report.layers[5].bits_per_element == pytest.approx((4.25 + 4.5) / 2)
    assert abs(got["fp8"] - exact) < 0.01  # E4M3 with a per-head scale is nearly lossless
    for name, value in got.items():
        assert exact - 0.05 < value < exact + 0.5, f"{name}: nll {value:.3f} vs {exact:.3f}"
    assert got["turboquant4"] < got["turboquant3"]
