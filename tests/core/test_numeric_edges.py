"""Numeric edges (issue 12, item 4): no silent Inf or zeros, clean errors for empty/meta input
and out-of-range arguments, kvq errors from every constructor, options that survive round
trips, codes that only their own pipeline dequantizes."""

import pytest
import torch

import kvq
from kvq.errors import KVQError, NumericsError, SpecError
from kvq.testing import sqnr_db

SPECS = ["ptok>int4", "ptok>int8", "ptok>int2(asym)", "nsep>pchan>int4", "pchan>int4(asym)",
         "group(32)>int4(asym)", "group(16,token)>int3", "rot>ptok>int4", "nsep>ptok>int8",
         "nsep(bf16)>pchan>int4(dtype=bf16)", "rot>group(32,token)>int4(asym)"]


def near_max(mag: float, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 16, 64, generator=g).clamp(-3, 3) / 3 * mag
    x[..., 0, 0], x[..., 1, 1] = mag, -mag
    return x.half()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("mag", [60000.0, 65000.0, 65504.0])
def test_fp16_near_max_stays_finite(spec, mag):
    """Finite output, or (metadata that itself overflows: norms, rotated zero points) a clear
    error naming the remedy."""
    x = near_max(mag)
    try:
        y = kvq.build(spec).roundtrip(x)
    except NumericsError as err:
        assert "overflows float16" in str(err) and "fp32" in str(err)
        return
    assert torch.isfinite(y).all()
    assert sqnr_db(x.float(), y.float()) > (0 if "int2" in spec else 10)


def test_saturation_only_replaces_overshoot():
    """Dequantized values past 65504 (quantization error on a finite input) become 65504."""
    x = near_max(65504.0)
    p = kvq.build("rot>ptok>int4")
    q = p.quantize(x)
    raw = kvq.backends.get_backend("torch").dequantize(p, q)  # what the backend alone gives
    y = p.dequantize(q)
    assert torch.isinf(raw).any()  # the case this guards against
    assert torch.equal(y[torch.isfinite(raw)], raw[torch.isfinite(raw)])
    assert (y[torch.isinf(raw)].abs() == 65504).all()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mag", [1e-4, 1e-6, 1e-7])
def test_tiny_inputs_keep_accuracy_or_say_so(spec, dtype, mag):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 2, 16, 64, generator=g) * mag).to(dtype)
    try:
        y = kvq.build(spec).roundtrip(x)
    except NumericsError as err:
        assert "fp32" in str(err) and "too small" in str(err)
        fp32 = spec.replace("int4(dtype=bf16)", "int4").replace("nsep(bf16)", "nsep")
        fp32 = fp32.replace("nsep", "nsep(fp32)")
        for b in ("int2", "int3", "int4", "int8"):
            fp32 = fp32.replace(f"{b}(asym)", f"{b}(asym,dtype=fp32)")
            fp32 = fp32.replace(f">{b}", f">{b}(dtype=fp32)") if f"{b}(" not in fp32 else fp32
        y = kvq.build(fp32).roundtrip(x)  # the remedy the message names works
    assert not (y == 0).all()
    assert sqnr_db(x.float(), y.float()) > (0 if "int2" in spec else 10)


def test_tiny_scale_is_rounded_up_not_to_zero():
    from kvq import dtypes

    x = torch.tensor([3e-8, 1e-5, 0.5, 0.0])
    out = dtypes.store(x, "fp16", "scale", round_up=True, check_precision=False)
    assert (out.float()[:3] >= x[:3]).all() and out[0] > 0 and out[3] == 0
    assert out[2] == x[2].half()  # normal range: the plain cast
    with pytest.raises(NumericsError, match="too small for fp16"):
        dtypes.store(x, "fp16", "scale", round_up=True)


@pytest.mark.parametrize("spec", ["ptok>int4", "nsep>pchan>int4", "none"])
@pytest.mark.parametrize("shape", [(0, 2, 8, 64), (1, 0, 8, 64), (1, 2, 8, 0), (1, 2, 0, 64)])
def test_empty_tensors(spec, shape):
    with pytest.raises(KVQError, match="empty"):
        kvq.build(spec).quantize(torch.randn(shape))


@pytest.mark.parametrize("spec", ["ptok>int4", "none"])
def test_meta_tensors(spec):
    with pytest.raises(KVQError, match="meta tensor"):
        kvq.build(spec).quantize(torch.randn(1, 2, 8, 64, device="meta"))


@pytest.mark.parametrize("spec", [f"rot(random,seed={2**64})>ptok>int4",
                                  f"group({2**31},token)>int4", f"group({2**31})>int4",
                                  f"int4(dtype={2**70})", f"rot(seed={-2**63 - 1})>int4"])
def test_out_of_range_arguments_fail_at_build(spec):
    with pytest.raises(SpecError):
        kvq.build(spec)


@pytest.mark.parametrize("make", [
    lambda: kvq.Pipeline(steps=1),
    lambda: kvq.Pipeline(steps=[{"type": "int", "bits": 5}]),
    lambda: kvq.Pipeline(steps=["int4"], x=1),
    lambda: kvq.Pipeline(steps="int4", check_finite="maybe"),
    lambda: kvq.KVConfig(),
    lambda: kvq.KVConfig(keys=3, values="int4"),
    lambda: kvq.KVConfig(keys="int4", values="int4", layers={"a": "int4"}),
    lambda: kvq.KVConfig(keys="int4", values="int4", layers=[1]),
], ids=range(8))
def test_constructors_raise_spec_errors(make):
    with pytest.raises(SpecError) as e:
        make()
    assert len(str(e.value).splitlines()) == 1


def test_check_finite_false_round_trips(tmp_path):
    p = kvq.build("ptok>int4; check_finite=false")
    assert not p.check_finite and p.to_spec() == "ptok>int4; check_finite=false"
    assert kvq.build(p.to_spec()) == p
    assert kvq.Pipeline.parse({"steps": "ptok>int4", "check_finite": False}) == p
    cfg = kvq.KVConfig(keys=p, values=kvq.build("int4"))
    for suffix in (".yaml", ".json"):
        cfg.save(tmp_path / f"c{suffix}")
        again = kvq.load(tmp_path / f"c{suffix}")
        assert again == cfg and not again.keys.check_finite and again.values.check_finite
    with pytest.raises(SpecError, match="unknown pipeline option"):
        kvq.build("ptok>int4; finite=no")
    x = torch.randn(1, 1, 4, 64)
    x[0, 0, 1, 3] = float("inf")
    assert kvq.build(p.to_spec()).quantize(x) is not None  # the option still acts


@pytest.mark.parametrize("a, b", [("ptok>int4", "nsep>pchan>int2"),
                                  ("ptok>int4", "group(32)>int4(asym)"),
                                  ("nsep>pchan>int4", "pchan>int4"), ("ptok>int4", "ptok>int8"),
                                  ("ptok>int4", "none"), ("none", "ptok>int4"),
                                  ("group(16,token)>int4", "group(32,token)>int4")])
def test_dequantize_with_another_pipeline_is_refused(a, b):
    q = kvq.build(a).quantize(torch.randn(1, 2, 32, 64))
    with pytest.raises(KVQError, match="quantized by"):
        kvq.build(b).dequantize(q)
    assert kvq.build(a + "; check_finite=false").dequantize(q).shape == (1, 2, 32, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_none_quantizer_copies_and_counts_real_bytes(dtype):
    x = torch.randn(1, 2, 8, 64).to(dtype)
    q = kvq.build("none").quantize(x)
    assert q.nbytes == x.numel() * x.element_size() and q.bits == 8 * x.element_size()
    x.add_(1)
    assert not torch.equal(kvq.build("none").dequantize(q), x)
