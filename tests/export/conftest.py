"""Tiny model geometries and directories for the export tests.

Real size for orientation: SmolLM2-135M has 30 layers, 3 KV heads, head_dim 64.
"""

from __future__ import annotations

import pytest

from kvq.export import Model


@pytest.fixture
def model() -> Model:
    """6 layers (so vLLM's 2 + 2 boundary layers leave 2 quantized), head_dim 64 (llama.cpp
    rotates)."""
    return Model(name="tiny", num_layers=6, kv_heads=2, head_dim=64)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved random tiny Llama (config.json + model.safetensors), head_dim 64, 6 layers."""
    import torch
    import transformers as tf

    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = tf.LlamaConfig(num_hidden_layers=6, hidden_size=128, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=96, vocab_size=96,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path
