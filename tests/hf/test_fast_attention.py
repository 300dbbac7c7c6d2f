"""The "kvq" attention (decode steps read packed K/V) equals SDPA over the dequantized cache.

The reference is the same model and cache configuration with ``attention="dequantize"`` (every
decode step dequantizes the layer and SDPA attends over it); the fast path must give the same
logits to float32 rounding, on every preset family, GQA, left-padded batches, beam search,
sliding windows and prompts crossing many blocks. Unknown steps must take the general path.
"""

from __future__ import annotations

import warnings
from typing import Literal

import pytest
import torch
import transformers as tf
from hf_models import COMMON, VOCAB, left_padded, tiny_model

import kvq
from kvq.errors import KVQError
from kvq.granularity import PerChannel
from kvq.hf import KVQCache, cache_kwargs, enable_fast_attention, fast_path_reason
from kvq.hf.attention import register
from kvq.kvconfig import KVConfig
from kvq.presets import FAMILIES
from kvq.quantizers import IntQuantizer
from kvq.transforms.base import Transform

ATOL = 2e-5  # fp32 logits of the tiny models are O(1); observed differences ~1e-7


@pytest.fixture(scope="module")
def wide():
    """Llama with head_dim 64 (kivi's and quanto's groups of 32/64 fit), GQA 4 -> 2 heads."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, intermediate_size=64, **COMMON)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def _set(model, name):
    register()
    model.set_attn_implementation(name)


@torch.no_grad()
def decode_logits(model, cache, ids, steps, mask=None, tokens=None):
    """Prefill ``ids`` then feed ``tokens`` (B, steps) one by one; logits (B, steps + 1, V)."""
    kw = cache_kwargs(model, cache)
    out = [model(ids, attention_mask=mask, use_cache=True, **kw).logits[:, -1]]
    for i in range(steps):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out.append(model(tokens[:, i:i + 1], attention_mask=mask, use_cache=True,
                         **kw).logits[:, -1])
    return torch.stack(out, dim=1)


def fast_vs_general(model, config, ids, steps=6, mask=None, scratch=None, **opts):
    tokens = torch.randint(3, VOCAB, (ids.shape[0], steps),
                           generator=torch.Generator().manual_seed(5))
    _set(model, "sdpa")
    ref = decode_logits(model, KVQCache(config, model.config, attention="dequantize", **opts),
                        ids, steps, mask, tokens)
    _set(model, "kvq")
    cache = KVQCache(config, model.config, attention="fast", **opts)
    for layer in cache.layers:
        layer.fast.scratch_elements = scratch or layer.fast.scratch_elements
    try:
        got = decode_logits(model, cache, ids, steps, mask, tokens)
    finally:
        _set(model, "sdpa")
    return got, ref


def prompt(batch=2, seq=75, seed=1):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# the integer families on model.config; turboquant's codebook takes the general path (see
# test_formats_added_later_fall_back), kvquant needs the model (pre-RoPE keys): see
# test_fast_calibrated.py
FAST_FAMILIES = [f for f in FAMILIES if f not in ("turboquant", "kvquant")]


@pytest.mark.parametrize("family", [*FAST_FAMILIES, "fp16"])
def test_every_preset_family_equals_sdpa_over_dequantized(wide, family, count_fast):
    bits = {"naive": 3, "quarot": 2, "pchan": 8}.get(family, 4)
    name = family if family == "fp16" else f"{family}{bits}"
    got, ref = fast_vs_general(wide, name, prompt(), residual=5, block=32)
    assert len(count_fast) == 6 * 2  # every decode step of both layers took the fast path
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("spec", ["nsep>rot>ptok>int4", "rot>nsep>pchan>int2(asym)",
                                  "group(8,token)>int3", "nsep(renorm=false)>group(16)>int8"])
def test_transform_orders_and_granularities(wide, spec, count_fast):
    got, ref = fast_vs_general(wide, spec, prompt(seq=37), residual=2, block=8)
    assert count_fast
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_prompt_crossing_many_blocks_with_decode_flushes(count_fast):
    model = tiny_model("llama")  # GQA: 4 query heads on 2 KV heads
    # ~50 prompt blocks, decode flushes two more; scratch for 12 tokens: 3 blocks per chunk
    got, ref = fast_vs_general(model, "nsep>pchan>int4", prompt(seq=201), steps=9, residual=1,
                               block=4, scratch=2 * 2 * 16 * 12)
    assert len(count_fast) == 9 * 2
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("prefill,residual", [("quantized", 3), ("exact", 0)])
def test_left_padded_batch(prefill, residual, count_fast):
    model = tiny_model("llama")
    ids, mask = left_padded(batch=3, seq=30, pads=(0, 7, 13))
    got, ref = fast_vs_general(model, "nsep>pchan>int4", ids, mask=mask,
                               residual=residual, block=4, prefill=prefill)
    assert count_fast
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_sliding_window_past_the_window(count_fast):
    model = tiny_model("mistral")  # sliding_window 12
    got, ref = fast_vs_general(model, "nsep>pchan>int4", prompt(seq=29), steps=8, residual=3,
                               block=4)
    assert count_fast
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox", "gptj", "qwen2", "gemma", "phi3"])
def test_other_families(family, count_fast):
    got, ref = fast_vs_general(tiny_model(family), "quarot4", prompt(seq=23), residual=2,
                               block=4)
    assert count_fast
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_beam_search_and_greedy_generate_match(count_fast):
    model = tiny_model("llama")
    ids, mask = left_padded(batch=2, seq=17, pads=(0, 5))
    outs = []
    for name, attention in (("sdpa", "dequantize"), ("kvq", "fast")):
        _set(model, name)
        cache = KVQCache("nsep>pchan>int4", model.config, residual=2, block=4,
                         attention=attention)
        out = model.generate(ids, attention_mask=mask, num_beams=3, do_sample=False,
                             max_new_tokens=7, min_new_tokens=7, output_scores=True,
                             return_dict_in_generate=True, **cache_kwargs(model, cache))
        outs.append(out)
    _set(model, "sdpa")
    assert count_fast
    assert_same_beams(*outs)


def assert_same_beams(a, b) -> None:
    """Two beam-search ``generate`` results (with ``output_scores``): the same sequences, and
    scores equal where finite (pruned beams are -inf in both)."""
    assert torch.equal(a.sequences, b.sequences)
    sa, sb = torch.stack(a.scores), torch.stack(b.scores)
    finite = torch.isfinite(sa)
    assert torch.equal(finite, torch.isfinite(sb))
    torch.testing.assert_close(sa[finite], sb[finite], atol=1e-4, rtol=0)


class Negate(Transform):
    """A transform the fast path does not know (stands for any later step)."""

    type: Literal["negate_for_test"] = "negate_for_test"

    def forward(self, x):
        return x.neg_(), {}

    def inverse(self, x, meta):
        return x.neg_()


def test_unknown_step_takes_the_general_path(count_fast):
    model = tiny_model("llama")
    p = kvq.Pipeline(steps=[Negate(), PerChannel(), IntQuantizer(bits=4)])
    assert "negate_for_test" in fast_path_reason(p)
    cfg = KVConfig(keys=p, values=kvq.build("nsep>pchan>int4"))
    _set(model, "kvq")
    try:
        with pytest.raises(KVQError, match="negate_for_test"):
            KVQCache(cfg, model.config, attention="fast")
        tokens = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(2))
        got = decode_logits(model, KVQCache(cfg, model.config, residual=2, block=4), prompt(seq=19),
                            4, tokens=tokens)
    finally:
        _set(model, "sdpa")
    assert not count_fast  # fell back: update dequantized, SDPA attended
    ref = decode_logits(model, KVQCache(cfg, model.config, residual=2, block=4,
                                        attention="dequantize"), prompt(seq=19), 4, tokens=tokens)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_model_without_attention_interface_keeps_the_general_path(count_fast):
    """Falcon does not dispatch through AttentionInterface: transformers refuses "kvq", so the
    cache stays on the general path ("auto") or says why ("fast")."""
    model = tiny_model("falcon")
    enable_fast_attention(model)
    with pytest.raises(KVQError, match="enable_fast_attention"):
        KVQCache("nsep>pchan>int4", model.config, attention="fast")
    decode_logits(model, KVQCache("nsep>pchan>int4", model.config, residual=2, block=4),
                  prompt(seq=11), 2, tokens=prompt(seq=2))
    assert not count_fast


def test_fast_needs_the_kvq_attention(llama):
    _set(llama, "sdpa")
    with pytest.raises(KVQError, match="enable_fast_attention"):
        KVQCache("nsep>pchan>int4", llama.config, attention="fast")
    with pytest.raises(KVQError, match="attention='sometimes'"):
        KVQCache("nsep>pchan>int4", llama.config, attention="sometimes")


def test_auto_uses_the_fast_path_only_with_kvq_attention(llama, count_fast):
    _set(llama, "sdpa")
    decode_logits(llama, KVQCache("nsep>pchan>int4", llama.config, residual=2, block=4),
                  prompt(seq=11), 2, tokens=prompt(seq=2))
    assert not count_fast
    enable_fast_attention(llama)
    try:
        decode_logits(llama, KVQCache("nsep>pchan>int4", llama.config, residual=2, block=4),
                      prompt(seq=11), 2, tokens=prompt(seq=2))
    finally:
        _set(llama, "sdpa")
    assert len(count_fast) == 2 * 2


def test_generate_with_cache_kwarg_warns_nothing(llama):
    cache = KVQCache("nsep>pchan>int4", llama.config, residual=2, block=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        llama.generate(prompt(seq=9), max_new_tokens=3, do_sample=False,
                       **cache_kwargs(llama, cache))


class _KvqConfig:
    _attn_implementation = "kvq"


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.float16, 2e-3),
                                        (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head_dim,spec", [(64, "nsep>pchan>int4"), (80, "rot>ptok>int2(asym)"),
                                           (96, "kivi3"), (128, "nsep>group(32)>int8"),
                                           (256, "quanto4")])
def test_layer_dtypes_and_head_dims(dtype, atol, head_dim, spec):
    """One layer, odd lengths (a 37-token prompt, then decode flushes): the fast step equals SDPA
    over the dequantized layer; fp16/bf16 to the model dtype's rounding (the general path rounds
    the dequantized K/V to it, the fast path attends in fp32)."""
    from kvq.hf.decode import FastDecode
    from kvq.hf.flash_decode import decode_attention
    from kvq.hf.layer import KVQLayer
    from kvq.loading import kv

    cfg = kv(spec)
    layer = KVQLayer(cfg.keys, cfg.values, residual=3, block=32, layer_idx=0)
    layer.fast = FastDecode(cfg.keys, cfg.values, _KvqConfig())
    g = torch.Generator().manual_seed(head_dim)
    b, h = 2, 3
    kv_ = [torch.randn(b, h, 37, head_dim, generator=g).to(dtype) for _ in range(2)]
    layer.update(*kv_)
    for _ in range(35):  # the window reaches residual + block: one block is flushed
        kw, vw = layer.update(*[torch.randn(b, h, 1, head_dim, generator=g).to(dtype)
                                for _ in range(2)])
    view = kw._kvq_view
    assert len(view.layer.k_store) == 37 + 32  # prompt (block + 5-token tail), one decode block
    q = torch.randn(b, 2 * h, 1, head_dim, generator=g).to(dtype)
    got = decode_attention(q, view, (kw, vw), None, head_dim ** -0.5)
    k, v = view.materialize()
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                           enable_gqa=True)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, atol=atol, rtol=0)


@pytest.mark.parametrize("spec", ["nsep>rot>lloyd4(none)", "q4_0", "phead>int4"])
def test_formats_added_later_fall_back(wide, spec, count_fast):
    """Quantizers and granularities added after the fast path (codebooks, llama.cpp blocks,
    per-head scales) are not in its table: "auto" keeps the general path, same logits."""
    cfg = kvq.kv(spec)
    assert fast_path_reason(cfg.keys) is not None
    tokens = prompt(seq=3, seed=7)
    _set(wide, "kvq")
    try:
        got = decode_logits(wide, KVQCache(cfg, wide.config, residual=2, block=32), prompt(seq=40),
                            3, tokens=tokens)
    finally:
        _set(wide, "sdpa")
    assert not count_fast
    ref = decode_logits(wide, KVQCache(cfg, wide.config, residual=2, block=32,
                                       attention="dequantize"), prompt(seq=40), 3, tokens=tokens)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


@pytest.mark.parametrize("option", ["pre_rope", "sinks"])
def test_layers_with_pre_rope_keys_or_sinks_take_the_fast_path(option, count_fast):
    """Pre-RoPE keys are rotated per chunk and sinks attended exactly (test_fast_calibrated.py
    covers the recipes that use them); here the plain integer pipeline."""
    model = tiny_model("llama")
    cfg = ({"keys": {"rope": "pre", "pipeline": "nsep>pchan>int4"}, "values": "nsep>pchan>int4"}
           if option == "pre_rope" else {"kv": "nsep>pchan>int4", "sinks": 1})
    enable_fast_attention(model)
    try:
        cache = KVQCache(cfg, model, residual=2, block=4, attention="fast")
        assert all(layer.fast.reason is None for layer in cache.layers)
        tokens = prompt(seq=4, seed=3)
        got = decode_logits(model, cache, prompt(seq=19), 4, tokens=tokens)
    finally:
        _set(model, "sdpa")
    assert len(count_fast) == 4 * 2
    ref = decode_logits(model, KVQCache(cfg, model, residual=2, block=4,
                                        attention="dequantize"), prompt(seq=19), 4, tokens=tokens)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


class ShiftedInt(IntQuantizer):
    """A plugin-style subclass of the built-in integer quantizer that keeps ``type: int`` but
    reads codes back with its own formula (issue 18 item 8)."""

    def dequantize(self, codes, meta, granularity):
        return super().dequantize(codes, meta, granularity) + 0.5


def test_subclass_of_a_builtin_keeping_its_type_takes_the_general_path(count_fast):
    """Coverage is decided on the exact class, not on ``type``: the fast read would apply the
    built-in affine map and silently drop the subclass's +0.5."""
    model = tiny_model("llama")
    p = kvq.Pipeline(steps=[PerChannel(), ShiftedInt(bits=4)])
    assert "ShiftedInt" in fast_path_reason(p)
    cfg = KVConfig(keys=p, values=p)
    tokens = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(2))
    _set(model, "kvq")
    try:
        with pytest.raises(KVQError, match="ShiftedInt"):
            KVQCache(cfg, model.config, attention="fast")
        got = decode_logits(model, KVQCache(cfg, model.config, residual=2, block=4),
                            prompt(seq=19), 4, tokens=tokens)
    finally:
        _set(model, "sdpa")
    assert not count_fast
    ref = decode_logits(model, KVQCache(cfg, model.config, residual=2, block=4,
                                        attention="dequantize"), prompt(seq=19), 4, tokens=tokens)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
