"""ModelOpt export: hf_quant_config.json (kv_cache_quant_algo, the schema-1 layer map vLLM's
ModelOpt reader takes) and the k_scale / v_scale tensors; static NVFP4 calibration."""

from __future__ import annotations

import json

import pytest
import torch
from export_tiny import calibration_ids, tiny_llama
from safetensors.torch import load_file

import kvq
from kvq.export import Refused, export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kvq.eval.calibrate import calibrate
    from kvq.eval.capture import capture

    path = tmp_path_factory.mktemp("tiny-mo")
    model = tiny_llama()
    model.save_pretrained(path)
    caps = [capture(model, w[None], sensitivity=False, key_ropes=("post",))
            for w in calibration_ids()]
    for recipe in ("fp8-tensor-max", "nvfp4"):
        calibrate(recipe, path.parent / f"{path.name}-{recipe}.yaml", progress=False,
                  captured=(model, caps), model=str(path))
    return path, caps


def cfg_of(tiny, recipe):
    path, _ = tiny
    return kvq.load(path.parent / f"{path.name}-{recipe}.yaml")


def mixed(tiny):
    """Layer 0 FP8, layer 1 NVFP4 (both calibrated)."""
    fp8, nv = cfg_of(tiny, "fp8-tensor-max"), cfg_of(tiny, "nvfp4")
    k1, v1 = nv.for_layer(1)
    return fp8.model_copy(update={"layers": {1: kvq.kvconfig.LayerOverride(keys=k1, values=v1)}})


def test_mixed_fp8_nvfp4_layer_map(tiny, tmp_path):
    out = tmp_path / "mo"
    res = export(mixed(tiny), "modelopt", model=str(tiny[0]), out=out)
    assert res.exact
    q = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert q["kv_cache_quant_algo"] == "MIXED_PRECISION" and q["kv_cache_schema_version"] == 1
    assert q["kv_cache_quantized_layers"] == {"model.layers.0.self_attn": {"quant_algo": "FP8"},
                                              "model.layers.1.self_attn": {"quant_algo": "NVFP4"}}
    scales = load_file(str(out / "kv_scales.safetensors"))
    assert sorted(scales) == sorted(f"model.layers.{i}.self_attn.{r}_proj.{r}_scale"
                                    for i in (0, 1) for r in "kv")
    # ModelOpt's formulas from the captured K/V themselves: FP8 amax/448, NVFP4 amax/(6*448)
    _, caps = tiny
    amax = max(c.keys["post"][1].abs().max() for c in caps)
    torch.testing.assert_close(scales["model.layers.1.self_attn.k_proj.k_scale"],
                               amax / (6 * 448), rtol=1e-6, atol=0)
    amax = max(c.values[0].abs().max() for c in caps)
    torch.testing.assert_close(scales["model.layers.0.self_attn.v_proj.v_scale"], amax / 448,
                               rtol=1e-6, atol=0)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.layers.0.self_attn.k_proj.k_scale"] == \
        "kv_scales.safetensors"


def test_uniform_fp8_and_skipped_layers(tiny, tmp_path):
    cfg = cfg_of(tiny, "fp8-tensor-max")
    res = export(cfg, "modelopt", model=str(tiny[0]))
    q = res.engine_args["hf_quant_config"]["quantization"]
    assert q["kv_cache_quant_algo"] == "FP8" and len(q["kv_cache_quantized_layers"]) == 2
    res = export({"kv": "fp8(e4m3,none)", "skip": [0]}, "modelopt", model=str(tiny[0]))
    q = res.engine_args["hf_quant_config"]["quantization"]
    assert q["kv_cache_quantized_layers"] == {"model.layers.1.self_attn": {"quant_algo": "FP8"}}


def test_static_nvfp4_with_the_dynamic_t_is_the_dynamic_quantizer(tmp_path):
    from kvq import codebooks

    torch.manual_seed(0)
    x = torch.randn(1, 2, 33, 64) * 2
    t = x.abs().amax() / (6 * 448)
    codebooks.write(tmp_path / "t.safetensors", {"L0.k.scale": t}, {})
    static = kvq.build(f"group(16)>fp4(nv,scale=static,source={tmp_path / 't.safetensors'}#L0.k)")
    dynamic = kvq.build("group(16)>fp4(nv)")
    one = x.reshape(1, 1, 66, 64)  # one (batch, head) block: dynamic t = the same amax
    torch.testing.assert_close(static.roundtrip(one), dynamic.roundtrip(one), rtol=0, atol=0)
    assert static.bits_per_element(64, 32) == pytest.approx(4.5)


@pytest.mark.parametrize("config, match", [
    ("naive4", "layer 0 keys are 'ptok>int4'"),
    ("nvfp4", "layer 0 keys are 'group\\(16\\)>fp4\\(nv\\)'"),   # dynamic second-level scale
    ("fp16", "quantizes no layer"),
    ({"kv": "fp8(e4m3,none)", "sinks": 1}, "no exact sink tokens"),
])
def test_refusals(tiny, config, match):
    with pytest.raises(Refused, match=match):
        export(config, "modelopt", model=str(tiny[0]))


def test_fp8_keys_nvfp4_values_refused(tiny):
    fp8, nv = cfg_of(tiny, "fp8-tensor-max"), cfg_of(tiny, "nvfp4")
    cfg = fp8.model_copy(update={"values": nv.values, "layers": {}})
    with pytest.raises(Refused, match="FP8 keys and NVFP4 values"):
        export(cfg, "modelopt", model=str(tiny[0]))


def test_static_scales_have_no_triton_kernel(tmp_path):
    """The Triton plan would compute absmax scales; static ones must stay on the torch path."""
    pytest.importorskip("triton")
    from kvq import codebooks
    from kvq.backends.triton.plan import KernelPlan, Unsupported

    codebooks.write(tmp_path / "s.safetensors", {"L0.k.scale": torch.tensor(0.01)}, {})
    src = f"source={tmp_path / 's.safetensors'}#L0.k"
    for spec in (f"fp8(e4m3,static,{src})", f"group(16)>fp4(nv,scale=static,{src})"):
        with pytest.raises(Unsupported, match="static scales have no kernel"):
            KernelPlan.from_pipeline(kvq.build(spec))
