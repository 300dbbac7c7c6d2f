"""KVConfig ``skip``: layers kept unquantized, negative indices from the end, honest bits."""

import json

import pytest
import torch
import transformers as tf
import yaml

import kvq
from kvq.hf import KVQCache
from kvq.hf.compat import cache_kwargs
from kvq.kvconfig import KVConfig


def cfg(**kw) -> KVConfig:
    return KVConfig.from_dict({"kv": "nsep>rot>lloyd4(none)", **kw})


def test_negative_indices_resolve_against_the_layer_count():
    c = cfg(skip=[0, 1, -2, -1])
    assert c.skipped(30) == {0, 1, 28, 29}
    assert c.skipped(3) == {0, 1, 2}  # overlapping ends
    assert c.for_layer(29, 30)[0].is_identity and not c.for_layer(2, 30)[0].is_identity
    assert cfg(skip=[3]).for_layer(3)[1].is_identity  # non-negative: no layer count needed


def test_skip_limit_half_never_skips_more_than_half():
    c = cfg(skip=[0, 1, -2, -1], skip_limit="half")
    assert [sorted(c.skipped(n)) for n in (1, 2, 3, 4, 5, 30)] == \
        [[], [0, 1], [0, 2], [0, 1, 2, 3], [0, 1, 3, 4], [0, 1, 28, 29]]
    assert c.for_layer(0, 1)[0].quantizer.type == "lloyd"  # a 1-layer model is quantized
    assert KVConfig.from_dict(yaml.safe_load(c.to_yaml())) == c
    assert c.to_dict()["skip_limit"] == "half" and "skip_limit" not in cfg().to_dict()
    with pytest.raises(kvq.SpecError, match="out of range"):
        cfg(skip=[0, 1, -2, -1]).skipped(1)  # without the limit: layer 1 of a 1-layer model
    with pytest.raises((kvq.SpecError, ValueError)):
        cfg(skip_limit="third")


@pytest.mark.parametrize("skip, layers, match", [
    ([0, 30], 30, "skip layer 30 is out of range for a model with 30 layers"),
    ([-31], 30, "skip layer -31 is out of range"),
    ([-1], None, "counts from the end"),
])
def test_out_of_range_and_unresolvable_indices(skip, layers, match):
    with pytest.raises(kvq.SpecError, match=match):
        cfg(skip=skip).for_layer(0, layers)


def test_bad_skip_lists_are_rejected():
    with pytest.raises(kvq.SpecError, match="twice"):
        cfg(skip=[1, 1])
    with pytest.raises(kvq.SpecError):
        cfg(skip="first")
    both = cfg(skip=[0], layers={0: {"kv": "ptok>int8"}})
    with pytest.raises(kvq.SpecError, match="both skipped and overridden"):
        both.check(num_layers=4, head_dim=64)
    with pytest.raises(kvq.SpecError, match="out of range"):
        cfg(skip=[-5]).check(num_layers=4, head_dim=64)


def test_round_trips_yaml_json_dict():
    c = cfg(name="tq", skip=[0, -1])
    assert c.to_dict()["skip"] == [0, -1]
    assert KVConfig.from_dict(yaml.safe_load(c.to_yaml())) == c
    assert KVConfig.from_dict(json.loads(c.to_json())) == c
    assert "skip" not in cfg().to_dict()


def test_bits_count_skipped_layers_at_fp16():
    c = cfg(skip=[0, -1])
    q = c.keys.bits_per_element(64, 32)
    assert q == 4 + 16 / 64
    assert c.bits_per_element(64, 32, num_layers=10) == pytest.approx((8 * q + 2 * 16) / 10)
    assert kvq.kv("turboquant4").skip == (0, 1, -2, -1)  # as vLLM does


def test_cache_keeps_skipped_layers_unquantized():
    torch.manual_seed(0)
    config = tf.LlamaConfig(num_hidden_layers=5, hidden_size=64, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=64, vocab_size=64)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 64, (1, 40))
    cache = KVQCache(cfg(skip=[0, -1]), config, residual=0)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    kinds = [layer.key_pipeline.quantizer.type for layer in cache.layers]
    assert kinds == ["none", "lloyd", "lloyd", "lloyd", "none"]
    report = cache.memory_report()
    fp32 = 40 * 32 * 4 * 2  # a skipped layer holds its K and V as they came (fp32 here)
    assert report.layers[0].quantized_bytes == report.layers[4].quantized_bytes == fp32
    assert report.layers[2].bits_per_element == pytest.approx(4 + 16 / 32)
    with pytest.raises(kvq.SpecError, match="out of range for a model with 5 layers"):
        KVQCache(cfg(skip=[7]), config)
