"""vLLM mapping: every dtype kvq maps, every refusal, the skip-layer rule."""

from __future__ import annotations

import pytest

import kvq
from kvq.export import Refused, export
from kvq.export import vllm as v


@pytest.mark.parametrize("dtype, preset", list(v.TURBOQUANT.items()))
def test_turboquant_presets_map_exactly(model, preset, dtype):
    res = export(preset, "vllm", model=model)
    assert res.exact and res.engine_args == {"kv_cache_dtype": dtype}
    assert res.command == f"vllm serve tiny --kv-cache-dtype {dtype}"


def test_turboquant_extra_skip_layers(model):
    # skip_limit "half" (vLLM's boundary rule) keeps entries within each half only: an extra
    # middle layer needs skip_limit "none", and the export follows what kvq runs either way
    limited = kvq.kv("turboquant4").model_copy(update={"skip": (0, 1, 3, -2, -1)})
    assert "kv_cache_dtype_skip_layers" not in export(limited, "vllm", model=model).engine_args
    cfg = limited.model_copy(update={"skip_limit": "none"})
    res = export(cfg, "vllm", model=model)
    assert res.engine_args == {"kv_cache_dtype": "turboquant_4bit_nc",
                               "kv_cache_dtype_skip_layers": ["3"]}
    assert res.command.endswith("--kv-cache-dtype-skip-layers 3")


def test_turboquant_without_boundary_layers_refused(model):
    cfg = kvq.kv("turboquant4").model_copy(update={"skip": ()})
    with pytest.raises(Refused, match=r"always keeps layers \[0, 1, 4, 5\].*layer 0"):
        export(cfg, "vllm", model=model)


@pytest.mark.parametrize("layers, expected", [(1, set()), (2, {0, 1}), (3, {0, 2}),
                                              (4, {0, 1, 2, 3}), (30, {0, 1, 28, 29})])
def test_boundary_layers(layers, expected):
    assert v.boundary_layers(layers) == expected


@pytest.mark.parametrize("spec, dtype", [("fp8(e4m3,none)", "fp8"), ("fp8(e5m2,none)",
                                                                     "fp8_e5m2")])
def test_fp8_scale_one(model, spec, dtype):
    res = export(spec, "vllm", model=model)
    assert res.exact and res.engine_args == {"kv_cache_dtype": dtype}


def test_fp8_with_unquantized_layers(model):
    cfg = kvq.kv({"kv": "fp8(e4m3,none)", "skip": [0, -1]})
    res = export(cfg, "vllm", model=model)
    assert res.engine_args["kv_cache_dtype_skip_layers"] == ["0", "5"]
    assert "--kv-cache-dtype-skip-layers 0 5" in res.command


def test_unquantized_is_auto(model):
    assert export("fp16", "vllm", model=model).engine_args == {"kv_cache_dtype": "auto"}


@pytest.mark.parametrize("config, match", [
    ("naive4", "no KV cache format for keys 'ptok>int4'"),
    ("fp8", "no KV cache format for keys 'phead>fp8'"),   # dynamic per-head scales
    ("turboquant2", "no KV cache format"),
    ("kivi2", "no KV cache format"),
    ({"keys": "fp8(e4m3,none)", "values": "fp8(e5m2,none)"}, "one fp8 format"),
    ({"kv": "fp8(e4m3,none)", "layers": {2: {"kv": "turboquant4"}}}, "one --kv-cache-dtype"),
    ({"keys": "fp8(e4m3,none)", "values": "none"}, "keys and values together"),
    ({"kv": "fp8(e4m3,none)", "sinks": 1}, "no exact sink tokens"),
    ({"keys": {"rope": "pre", "pipeline": "fp8(e4m3,none)"}, "values": "fp8(e4m3,none)"},
     "after the rotary embedding"),
])
def test_refusals_are_one_line_with_a_closest(model, config, match):
    with pytest.raises(Refused, match=match) as err:
        export(config, "vllm", model=model)
    assert "\n" not in str(err.value) and "closest: --kv-cache-dtype" in str(err.value)
    assert err.value.closest is not None and export(err.value.closest, "vllm", model=model).exact


def test_suggest_exports_the_closest(model):
    res = export("naive4", "vllm", model=model, suggest=True)
    assert not res.exact and "ptok>int4" in res.reason
    assert res.config.name in v.TURBOQUANT.values() or res.config.name.startswith("vllm-")
    assert kvq.kv(res.config.to_dict()) == res.config  # suggested.yaml loads as written
    assert res.files["suggested.yaml"] == res.config.to_yaml()


def test_closest_is_nearest_in_bits(model):
    from kvq.export.base import bits

    with pytest.raises(Refused) as err:
        export("naive8", "vllm", model=model)
    cands = v.candidates(model)
    target = bits(kvq.kv("naive8"), model)
    best = min(abs(bits(c, model) - target) for c in cands.values())
    assert abs(bits(err.value.closest, model) - target) == best
