"""NVFP4 (``group(16)>fp4(nv)``) against NVIDIA ModelOpt 0.47's ``NVFP4QTensor.quantize`` (its
file vendored, run on CPU): E2M1 codes, E4M3 block scales and the fp32 tensor scale, per
(batch, head). Row "NVFP4" of docs/parity.md."""

import pytest
import torch
from oracles import DTYPES, HEAD_DIMS, inputs, modelopt_nvfp4

import kvq
from kvq.quantizers import unpack


def modelopt(x: torch.Tensor):
    """ModelOpt on each (batch, head) slice (T, D) of x -> (codes, block scales, tensor scale)
    shaped as kvq stores them: (B, H, T, D) uint8, (B, H, T, D // 16) e4m3 bits, (B, H, 1, 1)."""
    nv = modelopt_nvfp4()
    codes, scales, ts = [], [], []
    for row in x.reshape(-1, *x.shape[-2:]):
        q, b, t = nv.quantize(row.clone(), 16)
        packed = q._quantized_data
        codes.append(torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(row.shape))
        scales.append(b.view(torch.uint8))
        ts.append(t.reshape(1, 1))
    b, h = x.shape[:2]
    scales = torch.stack(scales).reshape(b, h, *scales[0].shape)
    return torch.stack(codes).reshape(x.shape), scales, torch.stack(ts).reshape(b, h, 1, 1)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_codes_and_scales_are_modelopts(d, dtype):
    p = kvq.build("group(16)>fp4(nv)")
    for kind, x in inputs(d, dtype).items():
        q = p.quantize(x, backend="torch")
        codes, scales, t = modelopt(x)
        assert torch.equal(q.meta["tensor_scale"], t), f"{kind}: tensor scales differ"
        assert torch.equal(q.meta["scale"].reshape(scales.shape), scales), \
            f"{kind}: block scales differ"
        ours = unpack(q.codes, 4, d)
        assert torch.equal(ours, codes), f"{kind}: {(ours != codes).float().mean():.2%} of codes"


def test_clamp_and_negative_zero():
    """The two differences issue 19 found: a block 1e-7 below the head's absmax keeps a nonzero
    E4M3 scale (2**-9 after the clamp), and -0.0 gets code 0."""
    x = torch.zeros(1, 1, 1, 32)
    x[..., 0], x[..., 16], x[..., 17], x[..., 18] = 1.0, 1e-7, -0.0, -1e-7
    q = kvq.build("group(16)>fp4(nv)").quantize(x, backend="torch")
    assert q.meta["scale"].view(torch.float8_e4m3fn).float()[..., 1].item() == 2**-9
    codes = unpack(q.codes, 4, 32)[0, 0, 0]
    assert codes[17] == 0 and codes[18] == 8  # ModelOpt: sign from x < 0
    assert torch.equal(codes, modelopt(x)[0][0, 0, 0])


def test_all_zero_head_is_an_intended_difference():
    """ModelOpt divides 0 by 0 on an all-zero tensor (NaN scales); kvq stores zeros."""
    x = torch.zeros(1, 1, 4, 32)
    q = kvq.build("group(16)>fp4(nv)").quantize(x, backend="torch")
    assert torch.equal(kvq.build("group(16)>fp4(nv)").dequantize(q), x)
    assert torch.isnan(modelopt(x)[1].view(torch.float8_e4m3fn).float()).all()


@pytest.mark.parametrize("d", [64, 96])
def test_triton_kernel_agrees(d):
    """The Triton kernel (interpreted on CPU) stores the same codes and scales."""
    pytest.importorskip("triton")
    p = kvq.build("group(16)>fp4(nv)")
    for kind, x in inputs(d, torch.float16).items():
        a, b = p.quantize(x, backend="torch"), p.quantize(x, backend="triton")
        assert torch.equal(a.codes, b.codes), kind
        assert torch.equal(a.meta["scale"], b.meta["scale"]), kind
