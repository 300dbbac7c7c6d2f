"""compressed-tensors checkpoints: kvq's static FP8 scales equal llm-compressor's, the checkpoint
parses with the compressed-tensors package, and kvq's static FP8 cast is its fake-quantize.

The llm-compressor reference is a pinned fixture (fixtures/llmcompressor/README.md): the
llmcompressor 0.14 wheel pins compressed-tensors 0.19 and transformers 5.17, so it cannot be
installed beside kvq's test environment.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from export_tiny import calibration_ids, tiny_llama
from safetensors.torch import load_file

import kvq
from kvq.export import Refused, export

FIXTURE = Path(__file__).parent / "fixtures" / "llmcompressor"
ct = pytest.importorskip("compressed_tensors", reason="needs the test-export extra "
                         "(pip install '.[test-export]')")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, model, captured windows) of tests/export/export_tiny.py."""
    from kvq.eval.capture import capture

    path = tmp_path_factory.mktemp("tiny")
    model = tiny_llama()
    model.save_pretrained(path)
    caps = [capture(model, w[None], sensitivity=False, key_ropes=("post",))
            for w in calibration_ids()]
    return path, model, caps


def calibrated(tiny, recipe, tmp_path):
    from kvq.eval.calibrate import calibrate

    path, model, caps = tiny
    return calibrate(recipe, tmp_path / f"{recipe}.yaml", progress=False,
                     captured=(model, caps), model=str(path))


@pytest.mark.parametrize("recipe, strategy", [("fp8-tensor", "tensor"),
                                              ("fp8-head", "attn_head")])
def test_checkpoint_equals_llmcompressor(tiny, tmp_path, recipe, strategy):
    cfg = calibrated(tiny, recipe, tmp_path)
    out = tmp_path / "ckpt"
    res = export(tmp_path / f"{recipe}.yaml", "compressed-tensors", model=str(tiny[0]), out=out)
    assert res.exact and res.config == cfg
    ref = json.loads((FIXTURE / f"{strategy}.json").read_text())["quantization_config"]
    got = json.loads((out / "config.json").read_text())["quantization_config"]
    moved = kvq.load(out / "kvq_config.yaml")  # references the scales by absolute path
    assert [p.quantizer.static_scale().tolist() for p in moved.pipelines()] == \
        [p.quantizer.static_scale().tolist() for p in cfg.pipelines()]
    assert {k: v for k, v in got.items() if k != "version"} == \
        {k: v for k, v in ref.items() if k != "version"}
    want = load_file(str(FIXTURE / f"{strategy}.safetensors"))
    have = load_file(str(out / "kv_scales.safetensors"))
    assert sorted(have) == sorted(want)
    for name, w in want.items():
        assert have[name].shape == w.shape and have[name].dtype == w.dtype
        torch.testing.assert_close(have[name], w, rtol=2e-6, atol=0)


def test_checkpoint_parses_with_compressed_tensors(tiny, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy

    calibrated(tiny, "fp8-head", tmp_path)
    out = tmp_path / "ckpt"
    export(tmp_path / "fp8-head.yaml", "compressed-tensors", model=str(tiny[0]), out=out)
    data = json.loads((out / "config.json").read_text())
    qc = QuantizationConfig.model_validate(data["quantization_config"])
    assert qc.kv_cache_scheme.strategy == QuantizationStrategy.ATTN_HEAD
    assert qc.kv_cache_scheme.num_bits == 8 and not qc.kv_cache_scheme.dynamic
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.layers.1.self_attn.k_scale"] == "kv_scales.safetensors"
    assert all((out / f).is_file() for f in set(index["weight_map"].values()))
    import transformers as tf  # the weights still load (scales are extra tensors)

    config = tf.AutoConfig.from_pretrained(out)
    assert config.num_hidden_layers == 2


@pytest.mark.parametrize("per", ["tensor", "head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_static_fp8_is_compressed_tensors_fake_quantize(tmp_path, per, dtype):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from kvq import codebooks

    heads = 3
    scale = torch.tensor(0.0123) if per == "tensor" else torch.tensor([0.01, 0.02, 0.005])
    codebooks.write(tmp_path / "s.safetensors", {"L0.k.scale": scale}, {})
    p = kvq.build(f"fp8(e4m3,static,source={tmp_path / 's.safetensors'}#L0.k)")
    torch.manual_seed(0)
    x = (torch.randn(2, heads, 37, 64) * 3).to(dtype)  # odd length; some values saturate
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False,
                            strategy="tensor" if per == "tensor" else "attn_head")
    s = scale.reshape(1) if per == "tensor" else scale.reshape(heads, 1, 1)
    # in fp32, as vLLM's cache kernels compute float(x) / scale; returned in x's dtype
    want = fake_quantize(x.float(), s, torch.zeros_like(s), args).to(dtype)
    torch.testing.assert_close(p.roundtrip(x), want, rtol=0, atol=0)
    assert p.bits_per_element(64, 32) == 8


def test_refusals(tiny, tmp_path):
    with pytest.raises(Refused, match="static FP8 E4M3.*kvq calibrate --recipe fp8-tensor"):
        export("fp8(e4m3,none)", "compressed-tensors", model=str(tiny[0]))
    calibrated(tiny, "fp8-tensor", tmp_path)
    cfg = kvq.load(tmp_path / "fp8-tensor.yaml")
    with pytest.raises(Refused, match="leaves layer 0 unquantized"):
        export(cfg.model_copy(update={"skip": (0,)}), "compressed-tensors", model=str(tiny[0]))
    mixed = cfg.model_copy(update={"values": kvq.build("ptok>int8")})
    with pytest.raises(Refused, match="layer 0 values are 'ptok>int8'"):
        export(mixed, "compressed-tensors", model=str(tiny[0]))


def test_vllm_maps_calibrated_fp8(tiny, tmp_path):
    calibrated(tiny, "fp8-tensor", tmp_path)
    res = export(tmp_path / "fp8-tensor.yaml", "vllm", model=str(tiny[0]))
    assert res.exact and res.engine_args == {"kv_cache_dtype": "fp8"}
    assert any("compressed-tensors" in n for n in res.notes)


def test_calibrated_config_runs_in_the_cache(tiny, tmp_path):
    """What kvq scores: the tiny model with the calibrated per-head FP8 cache, near fp32."""
    from kvq.hf import KVQCache
    from kvq.hf.compat import cache_kwargs

    cfg = calibrated(tiny, "fp8-head", tmp_path)
    _, model, _ = tiny
    ids = calibration_ids()[:1]
    with torch.no_grad():
        ref = model(ids).logits
        got = model(ids, **cache_kwargs(model, KVQCache(cfg, model.config)),
                    use_cache=True).logits
    err = (got - ref).norm() / ref.norm()
    assert 0 < err < 0.05


@pytest.mark.parametrize("options, match", [({"key_rope": "pre"}, "after RoPE"),
                                            ({"sinks": 1}, "after RoPE"),
                                            ({"keys": "ptok>nuq(3)", "values": "ptok>nuq(3)"},
                                             "do not apply")])
def test_static_recipe_bad_options(tmp_path, options, match):
    from kvq.eval.calibrate import calibrate
    from kvq.eval.errors import EvalError

    with pytest.raises(EvalError, match=match):
        calibrate("fp8-tensor", tmp_path / "x.yaml", progress=False, **options)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tensors, match", [
    ({"L0.k.scale": torch.tensor(-1.0)}, "not a finite positive"),
    ({"L0.k.scale": torch.ones(2, 2)}, "not a finite positive"),
    ({"L0.k.scale": torch.tensor(float("inf"))}, "not a finite positive"),
    ({"L0.v.scale": torch.tensor(1.0)}, "'L0.k.scale' is not in"),
])
def test_corrupt_scale_files(tmp_path, tensors, match):
    from kvq import codebooks
    from kvq.errors import SpecError

    codebooks.write(tmp_path / "s.safetensors", tensors, {})
    with pytest.raises(SpecError, match=match):
        kvq.build(f"fp8(e4m3,static,source={tmp_path / 's.safetensors'}#L0.k)")


def test_scales_of_another_model_refused(tmp_path):
    from kvq import codebooks
    from kvq.errors import KVQError

    codebooks.write(tmp_path / "s.safetensors", {"L0.k.scale": torch.ones(4)},
                    {"num_layers": 2, "head_dim": 64})
    p = kvq.build(f"fp8(e4m3,static,source={tmp_path / 's.safetensors'}#L0.k)")
    with pytest.raises(KVQError, match="fitted for|are for 4 kv heads"):
        p.roundtrip(torch.randn(1, 3, 5, 64))
    cfg = kvq.kv({"kv": p.to_spec()})
    with pytest.raises(KVQError, match="calibrated for"):
        cfg.check(num_layers=30, head_dim=64)


def test_static_artifact_never_overwrites_and_is_pinned(tiny, tmp_path):
    """The static recipes write like every calibration: a user's file is refused before the fit,
    the YAML pins the scales' sha256, a cache keeps the scales it was built with, and a file
    changed afterwards is refused."""
    from safetensors.torch import save_file

    from kvq.errors import SpecError
    from kvq.eval.errors import EvalError

    mine = tmp_path / "fp8-tensor.yaml"
    mine.write_text("keys: ptok>int4\n")
    with pytest.raises(EvalError, match="not a YAML written by kvq calibrate"):
        calibrated(tiny, "fp8-tensor", tmp_path)
    assert mine.read_text() == "keys: ptok>int4\n"
    assert not mine.with_suffix(".safetensors").exists()
    mine.unlink()
    cfg = calibrated(tiny, "fp8-tensor", tmp_path)
    assert "sha256=" in mine.read_text()
    before = [p.quantizer.static_scale() for p in cfg.pipelines()]
    st = mine.with_suffix(".safetensors")
    from safetensors import safe_open

    with safe_open(st, "pt") as f:
        meta = f.metadata()
    save_file({k: v * 2 for k, v in load_file(st).items()}, st, metadata=meta)
    assert [p.quantizer.static_scale() for p in cfg.pipelines()] == before
    with pytest.raises(SpecError, match="changed since it was recorded"):
        kvq.load(mine)
