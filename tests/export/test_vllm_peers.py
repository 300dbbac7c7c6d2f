"""kvq's vLLM export tables against vLLM 0.33.0's own definitions: its TurboQuant config
module as vendored (unmodified, hash-checked) in tests/parity/peers, and the KV-cache dtype list
and skip-layer rule copied in peers/vllm_cache.py."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import kvq
from kvq.export import export
from kvq.export import vllm as v

sys.path.insert(0, str(Path(__file__).parent / "peers"))
sys.path.insert(0, str(Path(__file__).parent.parent / "parity"))
import vllm_cache  # noqa: E402
from oracles import peer  # noqa: E402

tq = peer("vllm_turboquant_config")


def model_config(layers: int):
    return SimpleNamespace(is_hybrid=False,
                           hf_text_config=SimpleNamespace(num_hidden_layers=layers))


def test_every_exported_dtype_is_a_vllm_dtype():
    assert set(v.FP8) | set(v.TURBOQUANT) | {"auto"} <= set(vllm_cache.CACHE_DTYPES)


def test_turboquant_table_covers_vllm_presets():
    from kvq.registry import PRESETS

    assert set(v.TURBOQUANT) == set(tq.TQ_PRESETS)
    assert all(name in PRESETS for name in v.TURBOQUANT.values())  # kvq/presets.py names


@pytest.mark.parametrize("dtype", sorted(tq.TQ_PRESETS))
def test_turboquant_presets_store_what_vllm_stores(dtype):
    """Key / value bits of vLLM's preset = those of the kvq preset it exports as."""
    cfg = tq.TurboQuantConfig.from_cache_dtype(dtype, head_dim=64)
    preset = kvq.kv(v.TURBOQUANT[dtype])
    keys, values = preset.keys.quantizer, preset.values.quantizer
    assert (keys.type == "fp8") == cfg.key_fp8
    assert keys.bits == cfg.key_quant_bits and values.bits == cfg.value_quant_bits
    # vLLM's slot: keys fp16 norm (or fp8), values fp16 scale + zero: kvq's bits/element
    slot_bits = 8 * (cfg.key_packed_size + cfg.value_packed_size) / 2 / 64
    assert preset.keys.bits_per_element(64, 32) + preset.values.bits_per_element(64, 32) == \
        pytest.approx(2 * slot_bits)


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 5, 6, 30, 40])
def test_boundary_layers_are_vllms(layers):
    want = {int(i) for i in tq.TurboQuantConfig.get_boundary_skip_layers(model_config(layers))}
    assert v.boundary_layers(layers) == want


@pytest.mark.parametrize("config", [
    "turboquant4", "turboquant3", "turboquant-k8v4", "turboquant-k3v4", "fp8(e4m3,none)",
    {"kv": "fp8(e4m3,none)", "skip": [0, 2, -1]},
    {"kv": "turboquant4", "skip": [0, 1, 3, -2, -1]},
    "fp16",
])
@pytest.mark.parametrize("layers", [3, 6, 30])
def test_vllm_runs_each_layer_as_kvq_does(config, layers):
    """vLLM's per-layer dtype from the exported arguments (its skip rule, its boundary layers)
    quantizes exactly the layers kvq's config quantizes."""
    model = kvq.export.Model("m", num_layers=layers, kv_heads=2, head_dim=64)
    cfg = kvq.kv(config)
    try:
        cfg.skipped(layers)
    except kvq.KVQError:
        pytest.skip("skip list beyond this model")
    res = export(cfg, "vllm", model=model)
    dtype = res.engine_args["kv_cache_dtype"]
    boundary = tq.TurboQuantConfig.get_boundary_skip_layers(model_config(layers))
    skip = vllm_cache.effective_skip_layers(
        dtype, res.engine_args.get("kv_cache_dtype_skip_layers", []), boundary)
    vllm = [vllm_cache.layer_kv_cache_dtype(dtype, i, skip) != "auto" for i in range(layers)]
    ours = [not cfg.for_layer(i, layers)[0].is_identity for i in range(layers)]
    assert vllm == ours
