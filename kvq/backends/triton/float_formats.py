"""Triton math of the scaled formats: fp8 (E4M3 / E5M2), fp4 (E2M1 with mx / nv scales) and
scaled codebooks (``lloyd``), as `kvq.quantizers.fp8` / ``fp4`` / ``codebook`` define them.

Used by the rows and token kernels (statistics -> :func:`format_scale` -> :func:`format_codes`)
and the dequantize kernel (:func:`format_values` x :func:`format_unscale`). FMT is
`KernelPlan.fmt_code`: 4 e4m3, 5 e5m2, 6 lloyd, 7 mx, 8 nv. Float conversions are done on the
bits with integer operations, round to nearest even (subnormals included), so the interpreter
and every GPU give torch's ``float8_e4m3fn`` / ``float8_e5m2`` casts, not the hardware's
(saturating) conversions; inputs are clamped to the format's maximum first, as the reference does.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

from kvq.backends.triton.common import cast_rne, round_half_even, to_float32

# E2M1 max (6) x E4M3 max (448): NVFP4's tensor scale is head absmax / 2688, and
# 1 / 2688 rounded to float32 (exact as a Python float), what torch on CUDA multiplies by
NV_TENSOR = tl.constexpr(2688.0)
NV_TENSOR_INV = tl.constexpr(float(np.float32(1) / np.float32(2688)))


@triton.jit
def div_scalar(a, b, inv_b, RECIP: tl.constexpr):
    """torch's ``tensor / python_float``: a correctly rounded division on CPU; on CUDA torch
    multiplies by the float32 reciprocal ``inv_b`` instead (``div_true_kernel_cuda``)."""
    if RECIP:
        return a * inv_b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _encode(v, MB: tl.constexpr, BIAS: tl.constexpr):
    """float32 -> bits of a float with MB mantissa bits and exponent bias BIAS (no overflow)."""
    SH: tl.constexpr = 23 - MB
    sign = ((v.to(tl.uint32, bitcast=True) >> 31) << 7).to(tl.int32)
    a = tl.abs(v)
    ab = a.to(tl.uint32, bitcast=True)
    r = ab + ((1 << (SH - 1)) - 1) + ((ab >> SH) & 1)  # carries into the exponent when due
    normal = ((r >> SH) - ((127 - BIAS) << MB)).to(tl.int32)
    small = a < 2.0 ** (1 - BIAS)  # subnormal: steps of 2**(1-BIAS-MB), exact scaling
    sub = round_half_even(tl.where(small, a, 0.0) * (2.0 ** (BIAS - 1 + MB))).to(tl.int32)
    return tl.where(small, sub, normal) | sign


@triton.jit
def _decode(u, MB: tl.constexpr, BIAS: tl.constexpr):
    """Bits (int32) of a float with MB mantissa bits and bias BIAS -> float32."""
    ub = u.to(tl.uint32)
    e = (ub >> MB) & ((1 << (7 - MB)) - 1)
    m = ub & ((1 << MB) - 1)
    normal = ((e + (127 - BIAS)) << 23) | (m << (23 - MB)) | ((ub & 128) << 24)
    sub = m.to(tl.float32) * (2.0 ** (1 - BIAS - MB))
    return tl.where(e == 0, tl.where((ub & 128) != 0, -sub, sub),
                    normal.to(tl.float32, bitcast=True))


@triton.jit
def fp8_encode(v, FMT: tl.constexpr):
    """float32 v with |v| <= fmax -> fp8 bit patterns (int32 0..255), round to nearest even."""
    if FMT == 4:
        return _encode(v, 3, 7)
    else:
        return _encode(v, 2, 15)


@triton.jit
def fp8_decode(u, FMT: tl.constexpr):
    """fp8 bit patterns (int32) -> float32 values (no NaN/Inf codes occur: inputs are clamped)."""
    if FMT == 4:
        return _decode(u, 3, 7)
    else:
        return _decode(u, 2, 15)


@triton.jit
def e2m1_encode(v, SIGN_OF_ZERO: tl.constexpr):
    """float32 -> E2M1 codes (int32 0..15): nearest of 0, .5, 1, 1.5, 2, 3, 4, 6, ties to the
    even mantissa, saturating at 6; sign bit from the sign bit of v (-0.0 -> 8) when
    SIGN_OF_ZERO, else from v < 0 (-0.0 -> 0), as ``to_e2m1``."""
    a = tl.abs(v)
    # midpoints 0.25 .75 1.25 1.75 2.5 3.5 5: count those below a; a tie on an odd one goes up
    q = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
         + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
         + (a > 5.0).to(tl.int32))
    if SIGN_OF_ZERO:
        return q | ((v.to(tl.uint32, bitcast=True) >> 31) << 3).to(tl.int32)
    return q | ((v < 0).to(tl.int32) << 3)


@triton.jit
def e2m1_decode(u):
    """E2M1 codes (int32) -> float32 values (code 8 is -0.0)."""
    i = u & 7
    e = i >> 1
    mag = tl.where(i < 2, i.to(tl.float32) * 0.5,
                   (2 + (i & 1)).to(tl.float32) * ((1 << e).to(tl.float32) * 0.25))
    return tl.where((u & 8) != 0, -mag, mag)


@triton.jit
def pow2(e):
    """2.0 ** e (float32, exact) for integer e in [-127, 127] (2**-127 is subnormal)."""
    b = tl.where(e >= -126, (e + 127) << 23, 1 << 22)
    return b.to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _store_down(s, dtype: tl.constexpr):
    """float32 s >= 0 -> dtype rounded toward zero, as ``scales.store_scale_down`` stores it
    (through ``dtypes.store``), and a flag where the reference raises instead: a finite s
    that overflows float16, an s below dtype's smallest normal that its nearest value misses by
    more than ``dtypes.SUBNORMAL_TOLERANCE`` (1/8), a nonzero s stored as 0."""
    if dtype == tl.float32:
        return s, s != s
    else:
        if dtype == tl.float16:
            rne = s.to(tl.float16)
            down = (rne.to(tl.uint16, bitcast=True) - 1).to(tl.float16, bitcast=True)
            st = tl.where(rne.to(tl.float32) > s, down, rne)
            bad = (rne.to(tl.float32) == float("inf")) | (s != s)
            tiny = 6.103515625e-05
        else:  # bfloat16: truncating the float32 bits rounds toward zero
            rne = cast_rne(s, tl.bfloat16)
            st = (s.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            bad = s != s
            tiny = 1.1754943508222875e-38
        err = tl.math.div_rn(tl.abs(to_float32(rne) - s), tl.maximum(s, 1.401298464324817e-45))
        bad = bad | ((s > 0) & (s < tiny) & (err > 0.125))
        return st, bad | ((to_float32(st) == 0) & (s > 0))


@triton.jit
def format_scale(amax, head_amax, top, inv_top, meta_ty: tl.constexpr, FMT: tl.constexpr,
                 RECIP: tl.constexpr):
    """Scales of groups with absmax ``amax`` (float32, any shape).

    Returns (stored scale in meta_ty, the float32 scale the codes are divided by, flag): fp8 and
    lloyd store ``amax / top`` rounded toward zero (top = fmax or max|level|); mx the E8M0 code
    of 2**(floor(log2 amax) - 2); nv the E4M3 code of ``amax / (6 t)`` with t = head_amax / 2688
    and divide by ``e4m3 * t`` (b clamped to [2**-9, 448] first, as ModelOpt does). flag:
    True where the reference raises (see :func:`_store_down`). RECIP: divide by the Python
    constants (fmax, 2688) as torch on CUDA does (see :func:`div_scalar`).
    """
    if FMT == 7:
        ex = ((amax.to(tl.uint32, bitcast=True) >> 23) & 255).to(tl.int32)
        e = tl.where(amax > 0, tl.minimum(tl.maximum(ex - 129, -127), 127), -127)
        return (e + 127).to(tl.uint8), pow2(e), amax != amax
    elif FMT == 8:
        t = div_scalar(head_amax, NV_TENSOR, NV_TENSOR_INV, RECIP)
        b = tl.math.div_rn(amax, 6.0 * tl.where(t == 0, 1.0, t))
        b = tl.where(b == 0, 1.0, b)
        code = fp8_encode(tl.minimum(tl.maximum(b, 0.001953125), 448.0), 4)  # [2**-9, 448]
        return code.to(tl.uint8), fp8_decode(code, 4) * t, b != b
    elif FMT == 6:  # lloyd: torch divides by a tensor (max|level|), correctly rounded
        st, bad = _store_down(tl.math.div_rn(amax, top), meta_ty)
        return st, to_float32(st), bad
    else:  # fp8: by the Python float fmax
        st, bad = _store_down(div_scalar(amax, top, inv_top, RECIP), meta_ty)
        return st, to_float32(st), bad


@triton.jit
def format_codes(y, s32, mids_ptr, FMT: tl.constexpr, BITS: tl.constexpr,
                 SCALED: tl.constexpr):
    """Codes (int32) of y given the float32 scale s32 (broadcastable; 0 divides by 1).

    fp8: bits of ``(y / s).clamp(-fmax, fmax)``; lloyd: ``#{mids m : y / s >= m}`` (mids: the
    2**BITS - 1 float32 midpoints); mx / nv: E2M1 of ``y / s``. SCALED=False (``fp8(none)``):
    y itself (the caller flags |y| > fmax, where the reference raises).
    """
    v = y
    if SCALED:
        v = tl.math.div_rn(y, tl.where(s32 == 0, 1.0, s32))
    if FMT == 6:
        u = tl.zeros(v.shape, tl.int32)
        for i in tl.static_range((1 << BITS) - 1):
            u += (v >= tl.load(mids_ptr + i)).to(tl.int32)
        return u
    elif FMT >= 7:
        return e2m1_encode(v, FMT == 7)
    else:
        if FMT == 4:
            v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        else:
            v = tl.minimum(tl.maximum(v, -57344.0), 57344.0)
        return fp8_encode(v, FMT)


@triton.jit
def format_unscale(s, t, FMT: tl.constexpr):
    """Stored scales (any dtype) -> the float32 factor the reference multiplies values by
    (t: nv's stored tensor scale, broadcastable; unused otherwise)."""
    if FMT == 7:
        return pow2(s.to(tl.int32) - 127)
    elif FMT == 8:
        return fp8_decode(s.to(tl.int32), 4) * t
    else:
        return to_float32(s)


@triton.jit
def format_values(u, levels_ptr, mask, FMT: tl.constexpr):
    """Codes (int32) -> float32 values before scaling (lloyd: its levels, read under mask)."""
    if FMT == 6:
        return tl.load(levels_ptr + u, mask=mask, other=0.0)
    elif FMT >= 7:
        return e2m1_decode(u)
    else:
        return fp8_decode(u, FMT)

