"""Bad input gives clear kvq errors; configuration sources and per-layer overrides."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import kvq
from kvq.hf import KVQCache, kv_geometry

CFG = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=64, vocab_size=64)  # head_dim 16


def kv(dtype=torch.float32, device="cpu", b=1, t=4):
    return (torch.randn(b, 2, t, 16).to(dtype=dtype, device=device),
            torch.randn(b, 2, t, 16).to(dtype=dtype, device=device))


def test_model_without_attention_kv_cache():
    with pytest.raises(kvq.KVQError, match="'mamba' has no standard attention KV cache"):
        KVQCache("nsep>pchan>int4", tf.MambaConfig(num_hidden_layers=2, hidden_size=32))
    with pytest.raises(kvq.KVQError, match="transformers model config"):
        KVQCache("nsep>pchan>int4", {"num_hidden_layers": 2})


def test_group_that_does_not_divide_head_dim():
    with pytest.raises(kvq.SpecError, match="head_dim 16"):
        KVQCache("group(24)>int4", CFG)


def test_override_of_a_missing_layer():
    cfg = {"kv": "ptok>int4", "layers": {5: "ptok>int2"}}
    with pytest.raises(kvq.SpecError, match="layer 5.*2 layers"):
        KVQCache(cfg, CFG)


def test_dtype_and_device_mismatches():
    cache = KVQCache("nsep>pchan>int4", CFG)
    with pytest.raises(kvq.KVQError, match="keys are torch.float32.*values are torch.bfloat16"):
        cache.update(kv()[0], kv(torch.bfloat16)[1], 0)
    cache.update(*kv(), 0)
    with pytest.raises(kvq.KVQError, match="holds torch.float32 K/V but got torch.bfloat16"):
        cache.update(*kv(torch.bfloat16, t=1), 0)
    with pytest.raises(kvq.KVQError, match="on cpu but got them on meta"):
        cache.update(*kv(device="meta", t=1), 0)
    with pytest.raises(kvq.KVQError, match="reorder_cache"):
        cache.update(*kv(b=3, t=1), 0)


@pytest.mark.parametrize("opts,match", [
    (dict(prefill="lazy"), "prefill='lazy'"),
    (dict(residual=-1), "residual=-1"),
    (dict(block=0), "block=0"),
    (dict(block=1), "at least 2 tokens"),
])
def test_bad_options(opts, match):
    with pytest.raises(kvq.KVQError, match=match):
        KVQCache("nsep>pchan>int4", CFG, **opts)


def test_block_must_be_a_multiple_of_the_token_group():
    with pytest.raises(kvq.KVQError, match="multiple of the token group 8"):
        KVQCache("group(8,token)>int4(asym)", CFG, block=12)
    KVQCache("group(8,token)>int4(asym)", CFG, block=16)


def test_config_sources_and_per_layer_overrides(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text("keys: ptok>int4\nvalues: ptok>int8\nlayers:\n  1: {kv: nsep>pchan>int3}\n")
    cache = KVQCache(str(path), CFG)
    assert cache.layers[0].key_pipeline.to_spec() == kvq.build("ptok>int4").to_spec()
    assert cache.layers[0].value_pipeline.to_spec() == kvq.build("ptok>int8").to_spec()
    assert cache.layers[1].key_pipeline.to_spec() == kvq.build("nsep>pchan>int3").to_spec()
    split = KVQCache(keys="ptok>int4", values="nsep>pchan>int4", model_config=CFG)
    assert split.layers[1].value_pipeline.token_axis_stats
    replaced = KVQCache.from_spec("kivi4", CFG, values="ptok>int8", block=32)
    assert replaced.layers[0].value_pipeline.to_spec() == kvq.build("ptok>int8").to_spec()
    with pytest.raises(kvq.KVQError, match="keys= and values="):
        KVQCache(keys="ptok>int4", model_config=CFG)
    assert "KVQCache(" in repr(cache) and "KVQLayer(" in repr(cache.layers[0])


def test_geometry_of_families():
    g = kv_geometry(tf.FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4))
    assert (g.num_layers, g.kv_heads, g.head_dim) == (2, 1, 16)
    g = kv_geometry(tf.MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     num_key_value_heads=2, sliding_window=7))
    assert g.sliding_windows == (7, 7) and g.kv_heads == 2
