"""Cache and kvq_hf options are checked with clear errors (issue 12, item 5)."""

from __future__ import annotations

import pytest
import transformers as tf

import kvq
from kvq.hf import KVQCache

CFG = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                     max_position_embeddings=4096)


@pytest.mark.parametrize("options, match", [
    (dict(residual=True), "residual=True"),
    (dict(residual=-1), "residual=-1"),
    (dict(residual=1.5), "residual=1.5"),
    (dict(residual="128"), "residual='128'"),
    (dict(block=True), "block=True"),
    (dict(block=0), "block=0"),
    (dict(keep_dequantized="no"), "keep_dequantized='no'"),
    (dict(keep_dequantized=1), "keep_dequantized=1"),
    (dict(prefill="x"), "prefill='x'"),
    (dict(backend="nope"), "backend='nope'"),
    (dict(block=10**9), "exceeds the model's context .4096 tokens.*never be quantized"),
    (dict(residual=4000, block=128), "residual=4000 \\+ block=128 exceeds"),
    (dict(residual=2**70), "exceeds"),
])
def test_bad_cache_options(options, match):
    with pytest.raises(kvq.KVQError, match=match):
        KVQCache("nsep>pchan>int4", CFG, **options)


def test_window_limit_without_a_known_context(monkeypatch):
    import kvq.hf.cache

    monkeypatch.setattr(kvq.hf.cache, "_context", lambda model_config: None)
    KVQCache("nsep>pchan>int4", CFG, residual=4000, block=128)  # fine: under 2**20
    with pytest.raises(kvq.KVQError, match="exceeds 1048576 tokens"):
        KVQCache("nsep>pchan>int4", CFG, block=2**20)


def test_good_options_still_pass():
    cache = KVQCache("nsep>pchan>int4", CFG, residual=0, block=4096, keep_dequantized=True,
                     backend="torch", prefill="exact")
    assert cache.options["block"] == 4096


@pytest.mark.parametrize("name, value, ok", [("residual", "128", 128), ("block", 32, 32),
                                             ("residual", " 64 ", 64), ("residual", "abc", None),
                                             ("block", "-1", None), ("block", True, None),
                                             ("block", 3.5, None)])
def test_kvq_hf_integer_args(name, value, ok):
    pytest.importorskip("lm_eval")
    from kvq.eval.errors import EvalError
    from kvq.eval.lm_eval_model import _int_option

    if ok is None:
        with pytest.raises(EvalError, match=f"kvq_hf model arg {name}="):
            _int_option(name, value)
    else:
        assert _int_option(name, value) == ok


@pytest.mark.parametrize("batch_size", [2, "8", "auto", "auto:4"])
def test_kvq_hf_refuses_batches(batch_size):
    pytest.importorskip("lm_eval")
    from kvq.eval.errors import EvalError
    from kvq.eval.lm_eval_model import KVQLM

    with pytest.raises(EvalError, match="only batch_size=1 .*right-pads"):
        KVQLM(pretrained="unused", batch_size=batch_size)  # refused before any model loads
    with pytest.raises(EvalError, match="residual='abc'"):
        KVQLM(pretrained="unused", residual="abc")
