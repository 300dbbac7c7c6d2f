"""The fast decode path over calibrated and KVQuant-class pipelines equals the general path.

Transform coding (``nsep>klt>alloc(b)``, tc2/3/4) and KVQuant (``sparse>nuq``, calibrated and
the uncalibrated preset) with pre-RoPE keys and sinks: the same model and cache with
``attention="dequantize"`` is the reference, decode step by decode step, to float32 rounding,
with a left-padded batch, a quantized or exact prefill, beam search, crop, sliding windows,
several rotary families and prompts read in many chunks. The fitted tensors are random but
valid (``fitted.py``); ``tests/eval/test_fast_calibrated_fit.py`` runs a real fit.
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from fitted import config, kvquant_specs, tc_spec, write_nuq, write_tc
from hf_models import VOCAB, left_padded, tiny_model
from test_fast_attention import ATOL, _set, assert_same_beams, decode_logits, prompt

import kvq
from kvq import codebooks
from kvq.hf import KVQCache, cache_kwargs, fast_path_reason
from kvq.quantizers.alloc import Alloc

LAYERS = 2


def geometry(model) -> tuple[int, int]:
    cfg = model.config.get_text_config()
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, dim


def recipe(model, name: str, tmp_path, rope: str = "pre", sinks: int = 1):
    """tc{b} / kvquant{b} on fitted files for ``model``; ``kvquant{b}-preset``: uncalibrated."""
    if name.endswith("-preset"):
        return name.removesuffix("-preset")
    heads, dim = geometry(model)
    bits = int(name[-1])
    if name.startswith("tc"):
        f = write_tc(tmp_path / f"{name}.safetensors", LAYERS, heads, dim, bits, seed=bits)
        specs = [(tc_spec(f, i, "k", bits), tc_spec(f, i, "v", bits)) for i in range(LAYERS)]
    else:
        f = write_nuq(tmp_path / f"{name}.safetensors", LAYERS, heads, dim, bits, seed=bits)
        specs = [kvquant_specs(f, i, bits) for i in range(LAYERS)]
    return config(specs, rope=rope, sinks=sinks)


def both_paths(model, cfg, ids, mask=None, steps=6, scratch=None, **opts):
    """(fast logits, general logits, fast cache) for a prefill and ``steps`` decode steps."""
    tokens = torch.randint(3, VOCAB, (ids.shape[0], steps),
                           generator=torch.Generator().manual_seed(5))
    _set(model, "sdpa")
    ref = decode_logits(model, KVQCache(cfg, model, attention="dequantize", **opts), ids, steps,
                        mask, tokens)
    _set(model, "kvq")
    cache = KVQCache(cfg, model, attention="fast", **opts)
    for layer in cache.layers:
        layer.fast.scratch_elements = scratch or layer.fast.scratch_elements
    try:
        got = decode_logits(model, cache, ids, steps, mask, tokens)
    finally:
        _set(model, "sdpa")
    return got, ref, cache


RECIPES = ["tc2", "tc3", "tc4", "kvquant2", "kvquant3", "kvquant4", "kvquant3-preset"]


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("prefill,residual", [("quantized", 3), ("exact", 0)])
def test_recipes_with_pre_rope_keys_and_sinks(name, prefill, residual, tmp_path, count_fast):
    model = tiny_model("llama")
    cfg = recipe(model, name, tmp_path)
    ids, mask = left_padded(batch=3, seq=30, pads=(0, 7, 13))
    got, ref, cache = both_paths(model, cfg, ids, mask, residual=residual, block=4,
                                 prefill=prefill)
    assert len(count_fast) == 6 * LAYERS  # every decode step of both layers
    assert all(layer.pre_rope and layer.sinks == 1 for layer in cache.layers)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["tc3", "kvquant3"])
def test_post_rope_keys_and_two_sinks(name, tmp_path, count_fast):
    """Post-RoPE keys: the klt basis is folded into the query, nothing rotates per token."""
    model = tiny_model("llama")
    got, ref, _ = both_paths(model, recipe(model, name, tmp_path, rope="post", sinks=2),
                             prompt(seq=37), residual=2, block=4)
    assert count_fast
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["gptj", "gpt_neox", "qwen2", "gemma", "phi3", "mistral"])
@pytest.mark.parametrize("name", ["tc3", "kvquant3"])
def test_rotary_families_and_sliding_window(family, name, tmp_path, count_fast):
    """Interleaved pairs (GPT-J), partial rotary (GPT-NeoX, GPT-J), one KV head (Gemma), and
    Mistral's sliding window of 12 over a 29-token prompt."""
    model = tiny_model(family)
    got, ref, _ = both_paths(model, recipe(model, name, tmp_path), prompt(seq=29), steps=8,
                             residual=3, block=4)
    assert count_fast
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_many_chunks_share_one_rope_table(tmp_path, count_fast):
    """~50 blocks read 3 blocks per chunk: every chunk is rotated for its own positions; the
    angles are computed once per forward for all layers."""
    model = tiny_model("llama")
    got, ref, _ = both_paths(model, recipe(model, "tc3", tmp_path), prompt(seq=201), steps=9,
                             residual=1, block=4, scratch=2 * 2 * 16 * 12)
    assert len(count_fast) == 9 * LAYERS
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_stored_factors(tmp_path, count_fast):
    """factors="store" keeps nsep's factor computed from the klt-shifted table lookup."""
    model = tiny_model("llama")
    got, ref, cache = both_paths(model, recipe(model, "tc3", tmp_path), prompt(seq=23),
                                 residual=2, block=4, factors="store")
    assert all("factor" in s.extra for s in cache.layers[0].k_store.segments)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["tc3", "kvquant3"])
def test_crop_back_into_blocks_then_decode(name, tmp_path, count_fast):
    model = tiny_model("llama")
    cfg = recipe(model, name, tmp_path)
    ids, mask = left_padded(batch=2, seq=26, pads=(0, 5))
    tokens = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(9))
    outs = []
    for impl, attention in (("sdpa", "dequantize"), ("kvq", "fast")):
        _set(model, impl)
        cache = KVQCache(cfg, model, attention=attention, residual=2, block=4)
        kw = cache_kwargs(model, cache)
        m = mask
        with torch.no_grad():
            model(ids, attention_mask=m, use_cache=True, **kw)
            cache.crop(-9)  # back into the quantized blocks
            m = m[:, :ids.shape[1] - 9]
            logits = []
            for i in range(tokens.shape[1]):
                m = torch.cat([m, m.new_ones(2, 1)], dim=1)
                logits.append(model(tokens[:, i:i + 1], attention_mask=m, use_cache=True,
                                    **kw).logits[:, -1])
        outs.append(torch.stack(logits, 1))
    _set(model, "sdpa")
    assert len(count_fast) == 8 * LAYERS
    torch.testing.assert_close(outs[1], outs[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["tc3", "kvquant3"])
def test_beam_search_matches(name, tmp_path, count_fast):
    model = tiny_model("llama")
    cfg = recipe(model, name, tmp_path)
    ids, mask = left_padded(batch=2, seq=17, pads=(0, 5))
    outs = []
    for impl, attention in (("sdpa", "dequantize"), ("kvq", "fast")):
        _set(model, impl)
        cache = KVQCache(cfg, model, residual=2, block=4, attention=attention)
        outs.append(model.generate(ids, attention_mask=mask, num_beams=3, do_sample=False,
                                   max_new_tokens=7, min_new_tokens=7, output_scores=True,
                                   return_dict_in_generate=True, **cache_kwargs(model, cache)))
    _set(model, "sdpa")
    assert count_fast
    assert_same_beams(*outs)


class PluginAlloc(Alloc):
    """A plugin subclass of a covered step: it may decode differently, so it is not covered."""

    type: Literal["plugin_alloc_for_test"] = "plugin_alloc_for_test"


def test_coverage_is_keyed_by_exact_class_and_refuses_unfoldable_orders(tmp_path):
    f = write_tc(tmp_path / "tc.safetensors", 1, 2, 16, 3)
    ref = f"source={f}#L0.k"
    covered = kvq.build(f"nsep>klt({ref})>alloc(3,{ref})")
    assert fast_path_reason(covered) is None
    plugin = kvq.Pipeline(steps=[*covered.steps[:2], PluginAlloc(bits=3, source=f"{f}#L0.k")])
    assert "PluginAlloc" in fast_path_reason(plugin)
    assert "klt before nsep" in fast_path_reason(kvq.build(f"klt({ref})>nsep>alloc(3,{ref})"))
    assert "first step" in fast_path_reason(kvq.build("nsep>sparse(0.01)>ptok>int4"))
    assert "sparse before" in fast_path_reason(kvq.build("sparse(0.01)>nsep>ptok>int4"))
    # a basis the step accepts (orthonormal to 1e-3) but the folds cannot assume
    _, tensors = codebooks.read(codebooks.resolve(f))
    tensors = dict(tensors)
    tensors["L0.k.klt.basis"] = tensors["L0.k.klt.basis"] * (1 + 3e-4)
    bent = codebooks.write(tmp_path / "bent.safetensors", tensors, {"num_layers": 1})
    why = fast_path_reason(kvq.build(f"klt(source={bent}#L0.k)>alloc(3,source={bent}#L0.k)"))
    assert "orthonormal only to" in why


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("name", ["tc3", "kvquant3"])
def test_half_precision_models(name, dtype, atol, tmp_path, count_fast):
    """fp16/bf16: the general path rounds the dequantized (and re-rotated) K/V to the model
    dtype, the fast path attends in fp32; they agree to the model dtype's rounding."""
    import copy

    model = copy.deepcopy(tiny_model("llama")).to(dtype)
    got, ref, _ = both_paths(model, recipe(model, name, tmp_path), prompt(seq=29), residual=2,
                             block=4)
    assert count_fast and got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=0)
