"""Pre-RoPE keys in KVQCache (kvq/hf/rope.py): exact round trips, what the quantizer sees, errors.

With the identity quantizer a pre-RoPE cache must give attention the same keys as transformers'
``DynamicCache`` up to fp32 rounding (the keys are un-rotated and re-rotated in float32), for
every RoPE family: half-split (Llama, Qwen2/3, Mistral, Phi3, Gemma 1/2, OLMo2, Falcon), one
angle per pair (gpt-oss), per layer type (Gemma 3's local and global rotary), partial (GPT-NeoX
rotary_pct=0.25), interleaved (Cohere), interleaved partial (GPT-J rotary_dim=8 of head_dim 16)
and models that rotate only some layers (Cohere2's sliding layers, SmolLM3's no_rope_layers).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from hf_models import COMMON, VOCAB, left_padded, tiny_model
from transformers import DynamicCache

import kvq
from kvq.errors import KVQError
from kvq.hf import KVQCache

ROPE_FAMILIES = ["llama", "qwen2", "mistral", "phi3", "gemma", "gpt_neox", "gptj", "falcon",
                 "gemma2", "gemma3", "qwen3", "cohere", "cohere2", "olmo2", "smollm3", "gpt_oss"]
#: layers each family does not rotate (their keys reach the cache pre-RoPE already)
NO_ROPE_LAYERS = {"cohere2": [1], "smollm3": [1]}
OPTS = dict(residual=3, block=4)  # decode tokens get flushed into blocks during the tests
PRE_ID = kvq.KVConfig.from_dict({"keys": {"rope": "pre", "pipeline": "fp16"}, "values": "fp16"})


def ids_for(batch=2, seq=13, seed=1):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, cache, **kw):
    out = model.generate(ids, past_key_values=cache, max_new_tokens=6, min_new_tokens=6,
                         output_scores=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores)


def read_keys(cache, i):
    """What layer i's attention would read now (every cached token, no sliding cut)."""
    return cache.layers[i]._read()[0]


def assert_keys_match(cache, ref):
    for i, layer in enumerate(ref.layers):
        got = read_keys(cache, i)[:, :, -layer.keys.shape[-2]:]  # sliding layers: the window
        torch.testing.assert_close(got, layer.keys, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_identity_pre_rope_equals_dynamic_cache(family):
    model = tiny_model(family)
    cfg = model.config
    ids, mask = left_padded(pads=(0, 4), seq=13)
    cases = {
        "greedy": (ids_for(), dict(do_sample=False)),
        "beam": (ids_for(), dict(num_beams=3, do_sample=False)),
        "padded": (ids, dict(attention_mask=mask, do_sample=False)),
    }
    for name, (inp, kw) in cases.items():
        ref = generate(model, inp, DynamicCache(config=cfg), **kw)
        cache = KVQCache(PRE_ID, model, **OPTS)
        got = generate(model, inp, cache, **kw)
        assert [i for i, la in enumerate(cache.layers) if not la.pre_rope] == \
            NO_ROPE_LAYERS.get(family, [])
        layer = cache.layers[0]  # Mistral's window (12) drops the oldest blocks
        assert layer.memory()["quantized_tokens"] >= (4 if layer.is_sliding else 12), \
            "nothing went through blocks"
        assert torch.equal(got[0], ref[0]), f"{family} {name}: tokens differ"
        torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gptj", "gemma", "gemma3", "cohere",
                                    "gpt_oss"])
def test_keys_equal_dynamic_cache_after_prefill_decode_and_crop(family):
    model = tiny_model(family)
    ref, cache = DynamicCache(config=model.config), KVQCache(PRE_ID, model, **OPTS)
    with torch.no_grad():
        for c in (ref, cache):
            model(ids_for(seq=11), past_key_values=c)
            for t in range(5):
                model(ids_for(seq=1, seed=10 + t), past_key_values=c)
        assert_keys_match(cache, ref)
        for c in (ref, cache):
            c.crop(-6)  # back into the quantized blocks
        assert cache.get_seq_length() == 10 and len(cache.rope) == 10
        outs = [model(ids_for(seq=3, seed=30), past_key_values=c).logits for c in (ref, cache)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    assert_keys_match(cache, ref)


def pre_rope_keys(model, family, ids):
    """Layer 0's keys before RoPE, (B, kv_heads, T, head_dim), read from its projection."""
    got = {}
    if family == "gptj":
        mod, d = model.transformer.h[0].attn.k_proj, model.config.n_embd // model.config.n_head
    elif family == "gpt_neox":
        mod = model.gpt_neox.layers[0].attention.query_key_value
        d = model.config.hidden_size // model.config.num_attention_heads
    elif family in ("qwen3", "gemma3", "olmo2", "cohere"):  # q/k norms come before RoPE
        mod, d = model.model.layers[0].self_attn.k_norm, model.model.layers[0].self_attn.head_dim
    else:
        mod, d = model.model.layers[0].self_attn.k_proj, model.model.layers[0].self_attn.head_dim
    handle = mod.register_forward_hook(lambda m, a, out: got.setdefault("k", out))
    with torch.no_grad():
        model(ids, past_key_values=KVQCache(PRE_ID, model, **OPTS))
    handle.remove()
    b, t = ids.shape
    k = got["k"]
    if family == "gpt_neox":
        return k.view(b, t, -1, 3 * d).transpose(1, 2)[..., d:2 * d]
    if family == "gemma3":  # normed after the transpose: already (B, H, T, D)
        return k
    return k.reshape(b, t, -1, d).transpose(1, 2)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gpt_neox", "gptj", "qwen3",
                                    "gemma3", "olmo2", "cohere"])
def test_the_quantizer_sees_the_keys_before_rope(family, monkeypatch):
    model = tiny_model(family)
    ids = ids_for(seq=12)
    want = pre_rope_keys(model, family, ids)
    seen = []
    from kvq.pipeline import Pipeline

    real = Pipeline.quantize

    def spy(self, x, backend="auto"):
        seen.append(x.clone())
        return real(self, x, backend=backend)

    monkeypatch.setattr(Pipeline, "quantize", spy)
    with torch.no_grad():
        model(ids, past_key_values=KVQCache(PRE_ID, model, residual=0, block=12))
    keys = seen[0]  # layer 0 keys: one block of 12 tokens, folded (B, H*1, 12, D)
    torch.testing.assert_close(keys, want, rtol=1e-5, atol=1e-5)
    post = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=post)
    assert not torch.allclose(post.layers[0].keys, want, atol=1e-3), "RoPE did nothing?"


def test_per_channel_scales_of_pre_rope_keys():
    """One token repeated: its pre-RoPE keys in layer 0 are the same at every position, so a
    per-channel int4 scale fits each channel exactly; after RoPE they turn with the position and
    per-channel int4 leaves a real error. The stored scales are the pre-RoPE channel maxima."""
    model = tiny_model("llama")
    ids = torch.full((1, 16), 7)
    ref = DynamicCache(config=model.config)
    errs, caches = {}, {}
    for rope in ("post", "pre"):
        cfg = kvq.KVConfig.from_dict({"keys": {"rope": rope, "pipeline": "pchan>int4"},
                                      "values": "fp16"})
        caches[rope] = KVQCache(cfg, model, residual=0, block=16)
        with torch.no_grad():
            model(ids, past_key_values=caches[rope])
    with torch.no_grad():
        model(ids, past_key_values=ref)
    exact = ref.layers[0].keys
    for rope, cache in caches.items():
        errs[rope] = ((read_keys(cache, 0) - exact).norm() / exact.norm()).item()
    assert errs["pre"] < 2e-3 < 0.02 < errs["post"], errs
    pre = pre_rope_keys(model, "llama", ids)
    scale = caches["pre"].layers[0].k_store.segments[0].q.meta["scale"]  # (1, H, 1, D)
    torch.testing.assert_close(scale.float(), pre.abs().amax(dim=2, keepdim=True) / 7,
                               rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("family,rope_parameters", [
    ("llama", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    ("llama", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
               "original_max_position_embeddings": 32}),
    ("phi3", {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
])
def test_rope_scaling_and_partial_rotary_are_the_models_own(family, rope_parameters):
    make = {"llama": tf.LlamaConfig, "phi3": tf.Phi3Config}[family]
    cfg = make(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=96, rope_parameters=rope_parameters,
               **COMMON)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    ref, cache = DynamicCache(config=cfg), KVQCache(PRE_ID, model, **OPTS)
    with torch.no_grad():
        for c in (ref, cache):
            model(ids_for(seq=40), past_key_values=c)
            model(ids_for(seq=1), past_key_values=c)
    assert_keys_match(cache, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trip_is_within_rounding(dtype):
    model = tiny_model("llama").to(dtype)
    try:
        ref, cache = DynamicCache(config=model.config), KVQCache(PRE_ID, model, **OPTS)
        with torch.no_grad():
            for c in (ref, cache):
                model(ids_for(seq=9), past_key_values=c)
        for i, layer in enumerate(ref.layers):
            got = read_keys(cache, i)
            assert got.dtype == dtype
            tol = 4 * torch.finfo(dtype).eps * layer.keys.abs().amax().item()
            assert (got - layer.keys).abs().amax().item() <= tol
    finally:
        model.float()


def test_per_layer_rope_and_keep_dequantized():
    model = tiny_model("llama")
    cfg = kvq.KVConfig.from_dict({"keys": {"rope": "pre", "pipeline": "pchan>int4"},
                                  "values": "ptok>int4", "layers": {1: {"keys": {"rope": "post"}}}})
    ids, mask = left_padded(pads=(0, 3), seq=14)
    outs = []
    for keep in (False, True):
        cache = KVQCache(cfg, model, keep_dequantized=keep, residual=1, block=4)
        assert [layer.pre_rope for layer in cache.layers] == [True, False]
        outs.append(generate(model, ids, cache, attention_mask=mask, num_beams=2))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)


def test_memory_counts_the_rotary_positions():
    model = tiny_model("llama")
    assert KVQCache("nsep>pchan>int4", model).rope is None
    cfg = kvq.KVConfig.from_dict({"keys": {"rope": "pre", "pipeline": "pchan>int4"},
                                  "values": "ptok>int4"})
    cache = KVQCache(cfg, model, **OPTS)
    with torch.no_grad():
        model(ids_for(seq=12), past_key_values=cache)
    total = cache.memory_report().total
    assert total.rope_bytes == cache.rope.nbytes == 12 * 4  # one shared row of int32 positions
    assert cache.nbytes == sum(layer.nbytes for layer in cache.layers) + 48
    assert "sinks+pos" in str(cache.memory_report())


@pytest.mark.parametrize("family", ["gpt2", "opt", "deepseek_v3"])
def test_models_without_rope_fail_clearly(family):
    with pytest.raises(KVQError, match="rope: post"):
        KVQCache(PRE_ID, tiny_model(family), residual=16)


def test_deepseek_v3_refusal_says_why():
    with pytest.raises(KVQError, match="latent as keys.*no RoPE to undo"):
        KVQCache(PRE_ID, tiny_model("deepseek_v3").config)


def test_gemma3_layers_use_their_own_rotary():
    """Gemma 3's sliding layers rotate with the local base (10k), full layers with the global
    one (1M): each layer's keys must be un-rotated with its own, or the round trip is off."""
    model = tiny_model("gemma3")
    params = model.config.rope_parameters
    assert params["sliding_attention"]["rope_theta"] != params["full_attention"]["rope_theta"]
    cache = KVQCache(PRE_ID, model, **OPTS)
    assert [la.rope.layer_type for la in cache.layers] == model.config.layer_types
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        for c in (ref, cache):
            model(ids_for(seq=21), past_key_values=c)
    assert_keys_match(cache, ref)
    wrong = cache.layers[1].rope
    wrong.layer_type = "sliding_attention"  # the full layer with the local rotary: wrong keys
    assert not torch.allclose(read_keys(cache, 1), ref.layers[1].keys, atol=1e-3)


def test_other_rope_problems_fail_clearly():
    falcon = tf.FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                             alibi=True, **COMMON)
    with pytest.raises(KVQError, match="alibi"):
        KVQCache(PRE_ID, falcon)
    dyn = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                         intermediate_size=96, **COMMON,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                          "rope_theta": 10000.0})
    with pytest.raises(KVQError, match="dynamic"):
        KVQCache(PRE_ID, dyn)
    model = tiny_model("llama")
    cache = KVQCache(PRE_ID, model.config)  # a config alone: no rotary module to read
    with pytest.raises(KVQError, match="not attached"), torch.no_grad():
        model(ids_for(seq=4), past_key_values=cache)
    cache.attach(model)
    with torch.no_grad():
        model(ids_for(seq=4), past_key_values=cache)
    with pytest.raises(KVQError, match="rotary embedding gave none"):
        cache.update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16), 0)  # not from a forward
