"""Triton codebook kernels (``[nsep][rot] > lloyd(b)(none)``) vs the torch reference.

(Scaled codebooks, ``lloyd4`` with a scale per group, run in the generic kernels:
test_triton_formats.py.)

Same parity rules as test_triton_parity.py: norms within one ulp, codes identical except where
the reference's value sits within 1e-6 of a midpoint (float32 sums in another order), the same
codes dequantize within a per-dtype tolerance.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

import kvq  # noqa: E402
from kvq.backends import get_backend  # noqa: E402
from kvq.errors import NumericsError  # noqa: E402
from kvq.quantizers.packing import pack, unpack  # noqa: E402
from kvq.testing import kv_like  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("0", "")
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

CASES = [  # spec, head_dim, seq, batch, dtype: a diagonal through the shapes
    ("nsep>rot>lloyd4(none)", 64, 33, 1, torch.float16),
    ("nsep>rot>lloyd3(none)", 128, 7, 3, torch.bfloat16),
    ("nsep>rot>lloyd2(none)", 96, 5, 1, torch.float32),
    ("nsep(fp32)>rot(random)>lloyd4(none,gaussian)", 80, 9, 2, torch.float32),
    ("rot>nsep>lloyd3(none)", 256, 4, 1, torch.float16),
    ("nsep(renorm=false)>lloyd4(none)", 64, 6, 2, torch.float32),
    ("lloyd2(none)", 64, 3, 1, torch.float32),
]


def mids(p, d):
    lv = p.quantizer.levels(d)
    return (lv[1:] + lv[:-1]) / 2


@pytest.mark.parametrize("spec,d,t,b,dtype", CASES,
                         ids=[f"{c[0]}-D{c[1]}-T{c[2]}" for c in CASES])
def test_parity(spec, d, t, b, dtype):
    p = kvq.build(spec)
    x = kv_like(b, 2, t, d, dtype=dtype, seed=d + t).to(DEVICE)
    if "nsep" not in spec:  # an unscaled codebook sees raw values: give them unit-vector scale
        x = (x.float() / x.float().norm(dim=-1, keepdim=True)).to(dtype)
    ref, tri = p.quantize(x, backend="torch"), p.quantize(x, backend="triton")
    assert list(tri.meta) == list(ref.meta) and tri.codes.shape == ref.codes.shape
    if "norm" in ref.meta:
        a, r = tri.meta["norm"].float(), ref.meta["norm"].float()
        torch.testing.assert_close(a, r, rtol=2e-3 if ref.meta["norm"].dtype != torch.float32
                                   else 1e-6, atol=0)
    u_tri, u_ref = unpack(tri.codes, p.bits, d).long(), unpack(ref.codes, p.bits, d).long()
    assert torch.equal(pack(u_tri.to(torch.uint8), p.bits), tri.codes), "padding codes not zero"
    moved = u_tri != u_ref
    if moved.any():  # only at a midpoint, by one level
        assert (u_tri - u_ref).abs().max() == 1 and moved.float().mean() < 1e-3
        h = x.float()
        for step in p.transforms:
            h, _ = step.forward(h)
        gap = (h[moved][:, None] - mids(p, d)).abs().min(dim=-1).values
        assert (gap < 1e-6).all()
    out, exp = p.dequantize(ref, backend="triton"), p.dequantize(ref, backend="torch")
    assert out.dtype == x.dtype and out.shape == x.shape
    tol = RTOL[dtype]
    torch.testing.assert_close(out.float(), exp.float(), rtol=tol,
                               atol=tol * exp.float().abs().max().item())


def test_turboquant_presets_run_on_triton():
    x = kv_like(1, 3, 40, 64, dtype=torch.float16).to(DEVICE)
    for name in ("turboquant4", "turboquant-k3v4"):
        keys = kvq.kv(name).keys
        assert get_backend("triton").why_unsupported(keys, x) is None
        torch.testing.assert_close(keys.roundtrip(x, backend="triton").float(),
                                   keys.roundtrip(x, backend="torch").float(),
                                   rtol=1e-3, atol=1e-3 * x.abs().max().item())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN/Inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_raises(bad):
    x = kv_like(1, 2, 6, 64).to(DEVICE)
    x[0, 1, 2, 3] = bad
    for spec in ("nsep>rot>lloyd4(none)", "lloyd3(none)"):
        with pytest.raises(NumericsError):
            kvq.build(spec).quantize(x, backend="triton")
