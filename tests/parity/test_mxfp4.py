"""MXFP4 (``group(32)>fp4(mx)``) against torchao 0.18's ``to_mx`` (FLOOR scale mode: OCP MX
v1.0, 6.3), run on CPU: E2M1 codes and E8M0 scales. Row "MXFP4" of docs/parity.md."""

import pytest
import torch
from oracles import DTYPES, HEAD_DIMS, inputs

import kvq
from kvq.quantizers import unpack

pytest.importorskip("torchao")
from torchao.prototype.mx_formats.mx_tensor import ScaleCalculationMode, to_mx  # noqa: E402


def torchao_mx(x: torch.Tensor):
    """to_mx on rows of x -> (codes (..., D) uint8, E8M0 scale bytes (..., D // 32))."""
    rows = x.reshape(-1, x.shape[-1])
    rows = rows.float() if rows.dtype == torch.float16 else rows  # to_mx takes fp32 and bf16
    scale, packed = to_mx(rows, torch.float4_e2m1fn_x2, 32, ScaleCalculationMode.FLOOR)
    packed = packed.view(torch.uint8)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(x.shape)
    return codes, scale.view(torch.uint8).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_codes_and_scales_are_torchaos(d, dtype):
    p = kvq.build("group(32)>fp4(mx)")
    for kind, x in inputs(d, dtype).items():
        q = p.quantize(x, backend="torch")
        codes, scale = torchao_mx(x)
        assert torch.equal(q.meta["scale"].reshape(scale.shape), scale), f"{kind}: scales"
        ours = unpack(q.codes, 4, d)
        assert torch.equal(ours, codes), f"{kind}: {(ours != codes).float().mean():.2%} of codes"
