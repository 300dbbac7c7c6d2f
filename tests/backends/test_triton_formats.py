"""Triton kernels of the float formats and scaled codebooks vs the torch reference.

``fp8(e4m3|e5m2)`` (scaled or not), ``fp4(mx|nv)`` and scaled ``lloyd`` on every granularity
the kernels run (ptok, pchan, group(g, channel|token), phead). Without a transform the kernels
are bit-exact: codes and metadata equal, and either backend dequantizes either's output to the
same values. Every kernel call here is checked not to have handed the input to the reference
(status 0), so equality is the kernels' own.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

import kvq  # noqa: E402
from kvq.backends.triton.plan import KernelPlan  # noqa: E402
from kvq.backends.triton.quantize_pack import quantize_pack  # noqa: E402
from kvq.errors import NumericsError  # noqa: E402
from kvq.quantized import QuantizedTensor  # noqa: E402
from kvq.quantizers.packing import unpack  # noqa: E402
from kvq.testing import kv_like  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("0", "")
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

EXACT = [  # spec, head_dim, seq, batch, dtype: each format meets several shapes and dtypes
    ("ptok>fp8", 64, 7, 2, F16), ("ptok>fp8(e5m2)", 80, 5, 1, BF16),
    ("phead>fp8", 96, 33, 2, F32), ("pchan>fp8(dtype=fp16)", 128, 9, 1, F16),
    ("group(16)>fp8(e5m2,dtype=bf16)", 256, 3, 1, BF16),
    ("group(16,token)>fp8(dtype=fp16)", 80, 37, 1, F32),
    ("fp8(e4m3,none)", 64, 5, 2, F16), ("fp8(e5m2,none)", 96, 3, 1, BF16),
    ("group(32)>fp4(mx)", 64, 7, 1, F32), ("group(32)>fp4(mx)", 96, 5, 2, BF16),
    ("group(32)>fp4(mx)", 256, 3, 1, F16), ("phead>fp4(mx)", 80, 7, 1, F16),
    ("group(16)>fp4(nv)", 64, 9, 2, F16), ("group(16)>fp4(nv)", 80, 5, 1, BF16),
    ("group(16)>fp4(nv)", 128, 3, 1, F32), ("pchan>fp4(nv)", 64, 11, 1, F32),
    ("lloyd4", 128, 7, 1, F16), ("pchan>lloyd3", 64, 33, 2, BF16),
    ("group(16)>lloyd2(dtype=fp32)", 80, 5, 1, F32),
    ("phead>lloyd4(absmax,gaussian)", 256, 3, 1, BF16),
    ("group(32,token)>lloyd3(dtype=bf16)", 96, 41, 1, F16),
]


def kernel_quantize(p, x) -> QuantizedTensor:
    """The kernels' own result (asserting they did not defer to the reference)."""
    plan = KernelPlan.from_pipeline(p)
    codes, meta, status = quantize_pack(plan, x)
    assert status == 0, f"the kernels deferred to the reference (status {status})"
    return QuantizedTensor(codes, meta, tuple(x.shape), x.dtype, plan.bits)


def assert_bit_exact(p, x):
    ref, tri = p.quantize(x, backend="torch"), kernel_quantize(p, x)
    assert torch.equal(tri.codes, ref.codes)
    assert list(tri.meta) == list(ref.meta)
    for k in ref.meta:
        assert tri.meta[k].dtype == ref.meta[k].dtype and torch.equal(tri.meta[k], ref.meta[k]), k
    exp = p.dequantize(ref, backend="torch")
    for got in (p.dequantize(ref, backend="triton"), p.dequantize(tri, backend="torch")):
        assert got.dtype == x.dtype and torch.equal(got, exp)
    torch.testing.assert_close(p.quantize(x, backend="triton").codes, ref.codes, rtol=0, atol=0)
    return ref


def _input(spec, b, t, d, dtype, seed):
    x = kv_like(b, 2, t, d, dtype=dtype, seed=seed, outliers=2)
    if "none" in spec:  # an unscaled fp8 takes values within its range
        x = x.float().clamp(-400, 400).to(dtype)
    return x.to(DEVICE)


@pytest.mark.parametrize("spec,d,t,b,dtype", EXACT,
                         ids=[f"{c[0]}-D{c[1]}-T{c[2]}-{str(c[4])[6:]}" for c in EXACT])
def test_bit_exact_with_torch(spec, d, t, b, dtype):
    x = _input(spec, b, t, d, dtype, seed=d + t)
    x[0, 0, t // 2] = 0  # a zero token
    x[-1, 1] = 0  # a zero head: zero scales, nv's zero tensor scale
    ref = assert_bit_exact(kvq.build(spec), x)
    y = kvq.build(spec).dequantize(ref, backend="triton")
    assert (y[-1, 1] == 0).all(), "zero groups stay zero"
    if "lloyd" not in spec:  # 0 is a level of fp8 / E2M1 (a 2**b-level codebook has none)
        assert ((y == 0) | (x != 0)).all(), "zeros stay zero"


@pytest.mark.parametrize("spec", ["nsep>rot>group(16)>fp4(nv)", "rot>phead>fp8",
                                  "nsep>rot>pchan>lloyd3", "rot>group(32,token)>fp4(mx)"])
def test_after_transforms(spec):
    """After nsep / rot the float32 sums run in another order: codes may move where the
    reference's value sits on a rounding boundary (rarely), the values agree closely."""
    p = kvq.build(spec)
    x = kv_like(1, 2, 19, 64, dtype=F16, seed=7).to(DEVICE)
    ref, tri = p.quantize(x, backend="torch"), kernel_quantize(p, x)
    u_ref, u_tri = unpack(ref.codes, p.bits, 64), unpack(tri.codes, p.bits, 64)
    assert (u_ref != u_tri).float().mean() < 5e-3
    for k in ref.meta:
        assert tri.meta[k].dtype == ref.meta[k].dtype
        torch.testing.assert_close(tri.meta[k].float(), ref.meta[k].float(), rtol=2e-3, atol=0)
    top = x.float().abs().max().item()
    torch.testing.assert_close(p.dequantize(ref, backend="triton").float(),
                               p.dequantize(ref, backend="torch").float(),
                               rtol=1e-3, atol=1e-3 * top)


def _fp8_grid(dtype):
    """Every finite value of an fp8 format, the midpoints between neighbours (ties) and the
    floats just beside them, both signs, -0.0: (1, 1, T, 64) float32."""
    vals = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    pos = vals[torch.isfinite(vals) & (vals >= 0)].unique()
    mids = (pos[1:] + pos[:-1]) / 2
    near = torch.cat([torch.nextafter(mids, mids * 0), torch.nextafter(mids, mids * 4)])
    v = torch.cat([pos, mids, near])
    v = torch.cat([v, -v, torch.tensor([-0.0])])
    return torch.nn.functional.pad(v, (0, -len(v) % 64)).view(1, 1, -1, 64)


@pytest.mark.parametrize("fmt,dtype", [("e4m3", torch.float8_e4m3fn),
                                       ("e5m2", torch.float8_e5m2)])
def test_fp8_every_value_and_tie_equals_torch_cast(fmt, dtype):
    x = _fp8_grid(dtype).to(DEVICE)
    q = assert_bit_exact(kvq.build(f"fp8({fmt},none)"), x)
    assert torch.equal(unpack(q.codes, 8, 64), x.to(dtype).view(torch.uint8))


def test_e2m1_ties_signs_and_tiny_blocks():
    """mx blocks with absmax 6 (scale 1): E2M1 ties, -0.0, saturation; a zero block, a block
    of subnormal-sized values (exponent clamped to -127), fp16's maximum."""
    ties = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, 0.2, 0.3, 4.9, 1.0, -0.0]
    row = torch.tensor(ties + [-v for v in ties] + [0.0] * 4)
    x = torch.stack([row, torch.zeros(32), row * 2.0**-140, row * 10000.0]).view(1, 1, 1, 128)
    for dtype in (F32, F16):
        assert_bit_exact(kvq.build("group(32)>fp4(mx)"), x.to(dtype).to(DEVICE))
    assert_bit_exact(kvq.build("group(16)>fp4(nv)"), x.to(DEVICE))


def test_subnormal_scales_and_inputs_in_the_kernels():
    """Scales below fp16's / bf16's smallest normal are kept as the reference keeps them (nearest
    subnormal, then toward zero), without deferring to it; bf16 subnormal inputs are exact."""
    x = kv_like(1, 2, 9, 64, seed=4)
    x[..., 5] *= 1e-3  # a quiet channel: its fp16 fp8 scale is subnormal
    assert_bit_exact(kvq.build("pchan>fp8(dtype=fp16)"), x.to(DEVICE))
    assert (kvq.build("pchan>fp8(dtype=fp16)").quantize(x).meta["scale"].float() < 2**-14).any()
    tiny = (x / x.abs().max() * 1e-37).to(BF16)  # bf16 subnormal inputs and scales
    assert_bit_exact(kvq.build("ptok>lloyd2(dtype=bf16)"), tiny.to(DEVICE))
    assert_bit_exact(kvq.build("group(32)>fp4(mx)"), tiny.to(DEVICE))


def _outcome(p, x, backend):
    try:
        return p.quantize(x, backend=backend)
    except NumericsError as exc:
        return str(exc)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's numpy
@pytest.mark.parametrize("spec,value,why", [
    ("ptok>fp8(dtype=fp16)", 1e8, "overflows float16"),  # scale past fp16's maximum
    ("lloyd4", 1e6, "overflows float16"),
    ("fp8(e4m3,none)", 500.0, "exceeds the e4m3 maximum"),  # the reference raises, no clamp
    ("group(16)>lloyd4", 1e-7, "too small for fp16"),  # fp16 subnormal scales: the
    ("group(16)>lloyd4", 1e-5, None),  # reference rounds them its way or raises
    ("ptok>fp8(e5m2,dtype=fp16)", 65504.0, None),  # fp16 inputs at their maximum stay finite
])
def test_overflow_policy_is_the_reference(spec, value, why):
    p = kvq.build(spec)
    x = kv_like(1, 1, 3, 64, seed=2)
    x = (x / x.abs().max() * value).to(F16 if value == 65504.0 else F32).to(DEVICE)
    ref, tri = _outcome(p, x, "torch"), _outcome(p, x, "triton")
    if why:
        assert isinstance(ref, str) and why in ref and tri == ref
    else:
        assert torch.equal(tri.codes, ref.codes) and torch.isfinite(p.dequantize(tri)).all()


@pytest.mark.parametrize("spec,d,t", [
    ("pchan>fp8(e5m2)", 64, 150),  # a sequence streamed in tiles: statistics pass, then codes
    ("group(24,token)>lloyd3", 80, 60),  # token groups that are not a power of two
    ("phead>fp4(mx)", 128, 70),  # head statistics over several tiles
    ("group(16)>fp4(nv)", 96, 50),  # many row tiles, one tensor scale per head
    ("pchan>fp4(nv)", 64, 100),
])
def test_bit_exact_with_gpu_tiles(monkeypatch, spec, d, t):
    """The GPU tile sizes (small tiles, streamed token blocks) run under the interpreter too."""
    from kvq.backends.triton import common

    monkeypatch.setattr(common, "GPU_TILES", True)
    assert_bit_exact(kvq.build(spec), kv_like(1, 2, t, d, dtype=F16, seed=t).to(DEVICE))


def test_cuda_division_by_python_floats(monkeypatch):
    """On CUDA, torch computes ``tensor / 448.0`` as ``tensor * float32(1 / 448)``; the kernels
    follow the device the reference would run on. Forced here: scales and codes must equal that
    CUDA-style reference (which differs from the CPU quotient in the last bit somewhere)."""
    from kvq.backends.triton import quantize_pack as qp

    monkeypatch.setattr(qp, "torch_divides_by_reciprocal", lambda x: True)
    x = kv_like(2, 3, 9, 64, seed=11).to(DEVICE)
    for fmt, dt, fmax in (("e4m3", torch.float8_e4m3fn, 448.0),
                          ("e5m2", torch.float8_e5m2, 57344.0)):
        q = kernel_quantize(kvq.build(f"ptok>fp8({fmt})"), x)
        amax = x.abs().amax(dim=-1, keepdim=True)
        s = amax * (torch.tensor(1.0) / fmax)
        assert not torch.equal(s.cpu(), amax.cpu() / fmax)  # CPU divides: differs here
        assert torch.equal(q.meta["scale"], s)
        assert torch.equal(unpack(q.codes, 8, 64), (x / s).clamp(-fmax, fmax).to(dt).view(
            torch.uint8))
    t = kernel_quantize(kvq.build("group(16)>fp4(nv)"), x).meta["tensor_scale"]
    assert torch.equal(t, x.abs().amax(dim=(-2, -1), keepdim=True) * (torch.tensor(1.0) / 2688))
