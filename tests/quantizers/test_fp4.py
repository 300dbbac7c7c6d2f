"""fp4: MXFP4 and NVFP4 against their definitions, written out here element by element."""

import math

import pytest
import torch

import kvq
from kvq.quantizers import unpack
from kvq.quantizers.fp4 import to_e2m1
from kvq.testing import check_step, kv_like

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def e2m1_reference(v: float) -> int:
    """Round to the nearest E2M1 value, ties to even mantissa, saturate (OCP MX spec 5.3)."""
    a = min(abs(v), 6.0)
    best = min(range(8), key=lambda i: (abs(E2M1[i] - a), i % 2))  # tie: even index = even m
    return best | (8 if math.copysign(1, v) < 0 else 0)


def test_e2m1_rounding_ties_and_saturation():
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    assert [E2M1[c & 7] for c in to_e2m1(torch.tensor(ties)).tolist()] == \
        [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    v = torch.cat([torch.linspace(-8, 8, 4001), torch.tensor([-0.0, 1e9, -1e9])])
    assert to_e2m1(v).tolist() == [e2m1_reference(x) for x in v.tolist()]


def mx_reference(block: list[float]) -> tuple[int, list[int]]:
    """OCP MX v1.0 6.3: X = 2**(floor(log2(amax)) - emax_elem), P_i = E2M1(V_i / X)."""
    amax = max(abs(v) for v in block)
    e = -127 if amax == 0 else max(-127, min(127, math.floor(math.log2(amax)) - 2))
    return e + 127, [e2m1_reference(v / 2.0**e) for v in block]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mxfp4_matches_the_ocp_definition(dtype):
    p = kvq.build("group(32)>fp4(mx)")
    x = kv_like(1, 2, 5, 64, dtype=dtype, seed=3)
    x[0, 0, 1, :32] = 0  # an all-zero block
    x[0, 1, 2, 5] = 2.0**-140  # a tiny value next to normal ones
    q = p.quantize(x)
    codes = unpack(q.codes, 4, 64)
    assert q.meta["scale"].dtype == torch.uint8 and q.meta["scale"].shape == (1, 2, 5, 2)
    xf = x.float()
    for h in range(2):
        for t in range(5):
            for blk in range(2):
                sl = slice(32 * blk, 32 * blk + 32)
                e, ref = mx_reference(xf[0, h, t, sl].tolist())
                assert q.meta["scale"][0, h, t, blk].item() == e
                assert codes[0, h, t, sl].tolist() == ref
    # E8M0 scale bits agree with torch's float8_e8m0fnu for these powers of two
    pow2 = torch.exp2(q.meta["scale"].float() - 127)
    assert torch.equal(pow2.to(torch.float8_e8m0fnu).view(torch.uint8), q.meta["scale"])
    y = p.dequantize(q)
    values = torch.tensor(E2M1 + [-v for v in E2M1])
    assert torch.equal(y.float(), (values[codes.long()].view(1, 2, 5, 2, 32)
                                   * pow2[..., None]).view(1, 2, 5, 64).to(dtype).float())


def nv_reference(x: torch.Tensor, g: int = 16):
    """NVFP4 as NVIDIA Model Optimizer's NVFP4QTensor computes it, on one (T, D) head."""
    t = x.abs().max() / (6.0 * 448.0)
    blocks = x.reshape(-1, g)
    pbs = blocks.abs().amax(dim=-1) / (6.0 * t)
    pbs[pbs == 0] = 1.0
    pbs8 = pbs.to(torch.float8_e4m3fn)
    scaled = blocks / (pbs8.float() * t)[:, None]
    codes = [e2m1_reference(v) for v in scaled.flatten().tolist()]
    return t, pbs8.view(torch.uint8), torch.tensor(codes).view(x.shape)


def test_nvfp4_matches_the_model_optimizer_definition():
    p = kvq.build("group(16)>fp4(nv)")
    x = kv_like(2, 3, 7, 64, seed=5)
    x[1, 2, 3, :16] = 0
    q = p.quantize(x)
    codes = unpack(q.codes, 4, 64)
    for b in range(2):
        for h in range(3):
            t, pbs, ref = nv_reference(x[b, h])
            assert q.meta["tensor_scale"][b, h].item() == t.item()
            assert torch.equal(q.meta["scale"][b, h].flatten(), pbs)
            assert torch.equal(codes[b, h].long(), ref)
    values = torch.tensor(E2M1 + [-v for v in E2M1])
    scale = q.meta["scale"].view(torch.float8_e4m3fn).float() * q.meta["tensor_scale"]
    want = (values[codes.long()].view(2, 3, 7, 4, 16) * scale[..., None]).view(x.shape)
    assert torch.equal(p.dequantize(q), want)


def test_honest_bits_per_element():
    assert kvq.build("group(32)>fp4(mx)").bits_per_element(head_dim=128, seq=32) == 4.25
    nv = kvq.build("group(16)>fp4(nv)")
    assert nv.bits_per_element(head_dim=64, seq=32) == 4.5 + 32 / (32 * 64)  # + tensor scale
    q = nv.quantize(kv_like(1, 3, 32, 64))
    assert q.nbytes == 3 * nv.nbytes(32, 64)


def test_no_fp16_overflow_and_zeros():
    x = torch.full((1, 1, 2, 32), 65504.0, dtype=torch.float16)
    x[..., 1::2] = -60000
    for spec in ("group(32)>fp4(mx)", "group(16)>fp4(nv)"):
        y = kvq.build(spec).roundtrip(x)
        assert torch.isfinite(y).all() and y.abs().max() <= 65504


def test_conformance():
    check_step("group(16)>fp4(mx)", min_sqnr=13)
    check_step("group(16)>fp4(nv)", min_sqnr=18)
    check_step("fp4(nv)", transforms="rot", min_sqnr=14)
