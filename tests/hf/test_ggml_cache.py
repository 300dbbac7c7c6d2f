"""llama.cpp's formats in KVQCache: they run through a model; other head dims fail early."""

import pytest
import torch
import transformers as tf

from kvq.errors import SpecError
from kvq.hf import KVQCache
from kvq.hf.compat import cache_kwargs


def llama(head_dim: int) -> tf.LlamaConfig:
    return tf.LlamaConfig(num_hidden_layers=2, hidden_size=2 * head_dim, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=64, vocab_size=64)


def test_rot_presets_run_a_model_and_8_bits_beat_4():
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(llama(64)).eval()
    ids = torch.randint(0, 64, (1, 40))
    err = {}
    with torch.no_grad():
        ref = model(ids).logits
        for name in ("q4_0-rot", "q8_0-rot"):
            got = model(ids, **cache_kwargs(model, KVQCache.from_spec(name, model.config))).logits
            assert torch.isfinite(got).all()
            err[name] = (got - ref).norm().item()
    assert 0 < err["q8_0-rot"] < err["q4_0-rot"] / 4


def test_head_dim_not_multiple_of_32_fails_at_construction():
    with pytest.raises(SpecError, match="head_dim 80.*blocks of 32 channels"):
        KVQCache.from_spec("q8_0", llama(80))
