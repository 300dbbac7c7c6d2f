"""fp8: codes equal torch's float8 casts of the scaled values; scale = amax / fmax; bits; errors."""

import pytest
import torch

import kvq
from kvq.quantizers import unpack
from kvq.testing import check_step, kv_like

FP8 = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("gran", ["ptok", "phead", "group(16)", "pchan"])
def test_codes_are_torch_casts_of_scaled_values(fmt, gran):
    dt, fmax = FP8[fmt]
    p = kvq.build(f"{gran}>fp8({fmt})")
    x = kv_like(2, 3, 21, 64, outliers=2)
    q = p.quantize(x)
    g = p.granularity
    amax = g.view(x).abs().amax(dim=g.reduce_dim, keepdim=True)
    scale = g.unview(g.from_meta(g.to_meta(amax)).expand(g.view_shape(x.shape)), x.shape) / fmax
    s = p.granularity.expand(q.meta["scale"], x.shape)
    assert q.meta["scale"].dtype == torch.float32
    torch.testing.assert_close(s, scale, rtol=1e-6, atol=0)
    codes = unpack(q.codes, 8, 64)
    want = (x / s).clamp(-fmax, fmax).to(dt).view(torch.uint8)
    assert torch.equal(codes, want)
    assert torch.equal(p.dequantize(q), want.view(dt).float() * s)


def test_known_bit_patterns_and_subnormals():
    x = torch.tensor([448.0, 1.0, -2.0, 2.0**-9, 0.0, -448.0, 2.0**-6]).view(1, 1, 1, -1)
    p = kvq.build("fp8(e4m3,none)")
    codes = unpack(p.quantize(x).codes, 8, 7)
    assert codes.flatten().tolist() == [0x7E, 0x38, 0xC0, 0x01, 0x00, 0xFE, 0x08]
    assert torch.equal(p.roundtrip(x), x)
    e5 = unpack(kvq.build("fp8(e5m2,none)").quantize(x).codes, 8, 7)
    assert e5.flatten().tolist()[:3] == [0x5F, 0x3C, 0xC0]


def test_phead_scale_is_one_per_head_and_bits():
    p = kvq.build("phead>fp8")
    x = kv_like(2, 3, 32, 64)
    q = p.quantize(x)
    assert q.meta["scale"].shape == (2, 3, 1, 1)
    assert p.bits_per_element(head_dim=64, seq=32) == 8 + 32 / (32 * 64)
    assert kvq.build("fp8(e4m3,none)").bits_per_element(head_dim=64, seq=32) == 8
    assert kvq.build("ptok>fp8(dtype=fp16)").bits_per_element(head_dim=128, seq=32) == 8 + 16 / 128


def test_unscaled_fp8_refuses_out_of_range_values():
    x = torch.tensor([1.0, 500.0]).view(1, 1, 1, 2)
    with pytest.raises(kvq.NumericsError, match="exceeds the e4m3 maximum 448"):
        kvq.build("fp8(e4m3,none)").quantize(x)
    y = kvq.build("fp8(e5m2,none)").roundtrip(x)
    assert y.flatten().tolist() == [1.0, 512.0]


def test_no_overflow_with_fp16_scales_near_the_fp16_max():
    x = torch.tensor([65504.0, -65504.0, 1.0, 3.0], dtype=torch.float16).view(1, 1, 1, 4)
    for fmt in ("e4m3", "e5m2"):
        y = kvq.build(f"fp8({fmt},dtype=fp16)").roundtrip(x)
        assert torch.isfinite(y).all() and y.abs().max() <= 65504


def test_sqnr_and_conformance():
    check_step("fp8", min_sqnr=28)
    check_step("fp8(e5m2)", min_sqnr=22)
    check_step("fp8(e4m3,none)", transforms="nsep", min_sqnr=28)
    check_step("phead", quantizer="fp8")
