"""CodebookQuantizer base: nearest-level encoding, tie rule, absmax / no scaling, packing, bits."""

from typing import Literal

import pytest
import torch

import kvq
from kvq.quantizers.codebook import CodebookQuantizer
from kvq.testing import kv_like, sqnr_db

LEVELS = {2: [-1.5, -0.25, 0.5, 2.0], 3: [-4.0, -2.0, -1.0, -0.1, 0.3, 1.0, 2.5, 5.0]}


class Fixed(CodebookQuantizer):
    """Test codebook: fixed, deliberately asymmetric levels (2**bits of them)."""

    type: Literal["fixedcb"] = "fixedcb"

    def codebook(self, head_dim):
        if self.bits in LEVELS:
            return torch.tensor(LEVELS[self.bits])
        return torch.linspace(-1, 1, 2**self.bits) ** 3


def nearest(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Brute-force nearest level index; ties to the upper level."""
    d = (v[..., None] - levels).abs()
    best = d.min(dim=-1, keepdim=True).values
    hits = d == best
    return (hits * torch.arange(len(levels))).amax(dim=-1)


def pipe(q: CodebookQuantizer, gran: str | None = None) -> kvq.Pipeline:
    steps = ([kvq.spec.build.make_step(gran)] if gran else []) + [q]
    return kvq.Pipeline(steps=steps)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_are_nearest_level_without_scale(bits):
    q = Fixed(bits=bits, scale="none")
    lv = q.levels(16)
    x = torch.randn(2, 3, 17, 16) * lv.abs().max()
    codes, meta = q.quantize(x.clone(), kvq.granularity.PerToken())
    assert meta == {}
    assert torch.equal(codes.long(), nearest(x, lv))
    p = pipe(q)
    torch.testing.assert_close(p.roundtrip(x), lv[nearest(x, lv)])
    assert p.nbytes(17, 16) == 17 * 16 * bits / 8


def test_ties_go_to_the_upper_level_and_outside_values_saturate():
    q = Fixed(bits=2, scale="none")
    lv = q.levels(8)
    mids = (lv[1:] + lv[:-1]) / 2
    x = torch.cat([mids, mids - 1e-6, torch.tensor([-100.0, 100.0, 0.1])])
    codes, _ = q.quantize(x.view(1, 1, 1, -1).clone(), kvq.granularity.PerToken())
    assert codes.flatten().tolist() == [1, 2, 3, 0, 1, 2, 0, 3, 1]


@pytest.mark.parametrize("gran", ["ptok", "pchan", "group(8)", "group(4,token)"])
def test_absmax_scaling_per_group(gran):
    q = Fixed(bits=3)
    p = pipe(q, gran)
    x = kv_like(1, 2, 12, 16, outliers=2)
    qt = p.quantize(x)
    s = p.granularity.expand(qt.meta["scale"], x.shape).float()
    assert qt.meta["scale"].dtype == torch.float16
    lv = q.levels(16)
    # the stored scale is absmax / max|level| (rounded to fp16) and is the one used
    absmax = p.granularity.expand(
        p.granularity.to_meta(p.granularity.view(x).abs().amax(dim=p.granularity.reduce_dim,
                                                               keepdim=True)), x.shape)
    exact = absmax / lv.abs().max()
    assert (s <= exact).all() and (s > exact * (1 - 2**-10)).all()  # fp16, rounded down
    codes = kvq.quantizers.unpack(qt.codes, 3, 16).long()
    assert torch.equal(codes, nearest(x / s, lv))
    torch.testing.assert_close(p.dequantize(qt), lv[codes] * s)
    assert p.nbytes(12, 16) == 12 * 16 * 3 / 8 + p.granularity.groups(12, 16) * 2


def test_decoded_values_never_exceed_the_absmax_in_fp16():
    x = torch.full((1, 1, 3, 8), 65504.0, dtype=torch.float16)
    x[..., ::2] *= -1
    y = pipe(Fixed(bits=2), "ptok").roundtrip(x)
    assert torch.isfinite(y).all() and y.abs().max() <= 65504


def test_scale_underflow_raises():
    x = torch.full((1, 1, 2, 8), 1e-9)
    with pytest.raises(kvq.NumericsError, match="underflows fp16|too small for fp16"):
        pipe(Fixed(bits=4), "ptok").quantize(x)
    assert torch.allclose(pipe(Fixed(bits=4, dtype="fp32"), "ptok").roundtrip(x), x, rtol=0.3)


def test_zero_groups_stay_zero_and_fp32_metadata():
    p = pipe(Fixed(bits=4, dtype="fp32"), "ptok")
    x = kv_like(1, 1, 6, 32)
    x[0, 0, 2] = 0
    y = p.roundtrip(x)
    assert torch.equal(y[0, 0, 2], torch.zeros(32))
    assert p.quantize(x).meta["scale"].dtype == torch.float32
    assert sqnr_db(x, y) > 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_round_trip(dtype):
    x = kv_like(2, 2, 9, 64, dtype=dtype)
    y = pipe(Fixed(bits=8), "ptok").roundtrip(x)
    assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()


def test_bad_codebook_is_rejected():
    class Broken(Fixed):
        type: Literal["brokencb"] = "brokencb"

        def codebook(self, head_dim):
            return torch.tensor([1.0, 0.0, 2.0, 3.0])

    with pytest.raises(ValueError, match="strictly increasing"):
        Broken(bits=2).levels(8)
    with pytest.raises(ValueError, match="shape"):
        Broken(bits=4).levels(8)  # 4 levels for 4 bits


def test_nonfinite_input_raises_without_metadata():
    x = kv_like(1, 1, 4, 16)
    x[0, 0, 1, 3] = float("nan")
    with pytest.raises(kvq.NumericsError):
        pipe(Fixed(bits=4, scale="none")).quantize(x)
    x[0, 0, 1, 3] = float("inf")
    with pytest.raises(kvq.NumericsError):
        pipe(Fixed(bits=4), "ptok").quantize(x)
