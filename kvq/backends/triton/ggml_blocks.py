"""Triton block math of llama.cpp's q4_0 / q4_1 / q8_0, as `kvq.quantizers.ggml` defines it.

Used by `_quantize_rows_kernel` (group(32, channel) rows) when the plan's ``fmt`` is a ggml
format. Like ggml's reference, codes use the float32 scale *before* its fp16 rounding, through
its correctly rounded reciprocal; the kernels launch without fused multiply-add, so
``v * inv + 8.5`` rounds twice as numpy does.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _inverse(d):
    """1 / d correctly rounded, 0 where d == 0 (ggml: ``id = d ? 1/d : 0``)."""
    safe = tl.where(d == 0, 1.0, d)
    return tl.where(d == 0, 0.0, tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), safe))


@triton.jit
def ggml_block_codes(y3, valid3, gvalid, FMT: tl.constexpr, GS: tl.constexpr):
    """Blocks y3 (BT, NG, GS) float32 -> (d (BT, NG) float32, block min (BT, NG), codes int32).

    valid3 (1, NG, GS) masks padded channels, gvalid (1, NG) all-padding blocks. Codes are kvq's
    unsigned ones: q4_0 the ggml nibble, q4_1 the nibble, q8_0 the int8 value + 128.
    """
    mn = tl.where(gvalid, tl.min(tl.where(valid3, y3, float("inf")), axis=2), 0.0)
    if FMT == 1:  # q4_0: d = (value of largest magnitude, first of ties) / -8
        ay = tl.where(valid3, tl.abs(y3), -1.0)
        amax = tl.max(ay, axis=2)
        lane = tl.arange(0, GS)[None, None, :]
        first = tl.min(tl.where(ay == amax[:, :, None], lane, GS), axis=2)
        d = tl.math.div_rn(tl.sum(tl.where(lane == first[:, :, None], y3, 0.0), axis=2), -8.0)
        v = y3 * _inverse(d)[:, :, None] + 8.5
        q = tl.minimum(tl.maximum(tl.floor(v), 0.0), 15.0)  # v > 0: floor == trunc
    elif FMT == 2:  # q4_1: d = (max - min) / 15
        mx = tl.where(gvalid, tl.max(tl.where(valid3, y3, -float("inf")), axis=2), 0.0)
        d = tl.math.div_rn(mx - mn, 15.0)
        v = (y3 - mn[:, :, None]) * _inverse(d)[:, :, None] + 0.5
        q = tl.minimum(tl.maximum(tl.floor(v), 0.0), 15.0)
    else:  # q8_0: d = max |x| / 127, codes rounded half away from zero (gguf's np_roundf)
        d = tl.math.div_rn(tl.max(tl.where(valid3, tl.abs(y3), 0.0), axis=2), 127.0)
        v = y3 * _inverse(d)[:, :, None]
        a = tl.abs(v)
        f = tl.floor(a)
        b = f + tl.floor((a - f) * 2.0)
        q = tl.minimum(tl.maximum(tl.where(v < 0, -b, b), -127.0), 127.0) + 128.0
    return d, mn, q.to(tl.int32)


@triton.jit
def ggml_fp16_overflow(y3, valid3, s16, z16, FMT: tl.constexpr):
    """(BT, NG) True where a block float16 can hold would dequantize past 65504 through its
    fp16-rounded scale s16 (and minimum z16): the reference raises NumericsError there."""
    fits = tl.max(tl.where(valid3, tl.abs(y3), 0.0), axis=2) <= 65504.0
    if FMT == 1:
        reach = 8.0 * tl.abs(s16)
    elif FMT == 2:
        reach = tl.maximum(tl.abs(z16), tl.abs(s16 * 15.0 + z16))
    else:
        reach = 127.0 * tl.abs(s16)
    return fits & (reach > 65504.0)
