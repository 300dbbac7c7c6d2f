"""Triton helpers shared by the quantize+pack and unpack+dequantize kernels, plus tile choice.

Tiles are (BT tokens, DP channels) with DP = next power of two >= max(head_dim, 16); padded
channels are masked to 0 and get code 0 (the packed layout pads rows with zero codes). Row
indices are int64, so caches over 2**31 elements address correctly.
All math is float32 with correctly rounded division and sqrt (div_rn / sqrt_rn), as in torch.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# 1.5 * 2**23: adding and subtracting it rounds a float32 |v| < 2**22 to an integer, half to even
# (the IEEE default rounding mode), exactly like torch.round. Callers clamp v first.
_RNE_MAGIC = tl.constexpr(12582912.0)


_launch_hook = None  # set by compile_check.compile_only: launches compile instead of running


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs); inside ``compile_check.compile_only`` it only compiles."""
    if _launch_hook is not None:
        return _launch_hook(kernel, args, kwargs)
    return kernel[grid](*args, **kwargs)


def is_interpreted(kernel) -> bool:
    """True when `kernel` runs under TRITON_INTERPRET=1 (numpy on the host)."""
    return isinstance(kernel, InterpretedFunction)


def padded_dim(d: int) -> int:
    """DP: the power-of-two tile width holding a row of d channels (>= 16 for tl.dot)."""
    return max(16, triton.next_power_of_2(d))


# True: the interpreter uses the GPU tile sizes too (tests run the GPU tiling paths this way:
# streamed token blocks, several blocks per tile, chunked rotation).
GPU_TILES = False


def tiles(n_rows: int, dp: int, interpreted: bool) -> tuple[int, int]:
    """(BT rows per tile, BK reduction chunk of the rotation dot) for n_rows rows of width dp.

    Interpreter: one big tile (up to 2**18 values; its cost is per op, not per element).
    GPU: about 2K fp32 values per tile, rotation in 16/32-wide chunks (reasonable, not tuned).
    """
    if interpreted and not GPU_TILES:
        return max(16, min(triton.next_power_of_2(n_rows), 2**18 // dp)), dp
    return max(16, min(64, 2048 // dp)), min(dp, 16 if dp >= 256 else 32)


def token_tiles(t: int, tg: int, dp: int, interpreted: bool) -> tuple[int, int, bool]:
    """(BT, G, single) for statistics over blocks of tg tokens out of t (pchan: tg = t).

    single: one tile holds BT // G whole blocks of G tokens (tg a power of two, or the whole
    sequence), so one pass suffices; otherwise blocks are streamed in BT-token tiles twice.
    """
    bt = tiles(t, dp, interpreted)[0]
    cap = 2**18 if interpreted and not GPU_TILES else 2**13
    if tg >= t and triton.next_power_of_2(t) * dp <= cap:  # the whole sequence is one block
        g = max(16, triton.next_power_of_2(t))
        return g, g, True
    if tg < t and tg & (tg - 1) == 0 and tg * dp <= cap:
        return max(bt, tg), tg, True
    return bt, tg, False


def launch_options(bt: int, dp: int) -> dict:
    """Launch options: 8 warps for tiles over 4K values; no fused multiply-add, so every product
    and sum is rounded as in the torch reference."""
    return dict(num_warps=8 if bt * dp > 4096 else 4, enable_fp_fusion=False)


def row_bytes(d: int, bits: int) -> int:
    """Bytes of one packed row: ceil(d / 8) * bits."""
    return -(-d // 8) * bits


@triton.jit
def round_half_even(v):
    """torch.round for |v| < 2**22 (callers clamp first)."""
    return (v + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def cast_rne(v, dtype: tl.constexpr):
    """float32 v -> dtype, round to nearest even. bfloat16 is rounded with integer ops because
    the interpreter truncates fp32 -> bf16 casts (the GPU rounds; both now agree with torch)."""
    if dtype == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def to_float32(v):
    """v -> float32 exactly. bfloat16 goes through its bits: the interpreter's own conversion
    loses bfloat16 subnormals (the GPU's is exact; both now agree with torch)."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def load_rows(x_ptr, rows, rmask, cols, D):
    """(BT, K) float32 tile of x rows at columns cols; masked entries are 0."""
    mask = rmask[:, None] & (cols < D)[None, :]
    return to_float32(tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0))


@triton.jit
def unit_rows(y):
    """(y / ||y||, ||y||) per row; rows with norm 0 become 0."""
    n = tl.sqrt_rn(tl.sum(y * y, axis=1))
    safe = tl.where(n > 0, n, 1.0)
    return tl.where(n[:, None] > 0, tl.math.div_rn(y, safe[:, None]), 0.0), n


@triton.jit
def load_transformed(x_ptr, r_ptr, rows, rmask, D,
                     BT: tl.constexpr, DP: tl.constexpr, BK: tl.constexpr,
                     NSEP: tl.constexpr, HAS_ROT: tl.constexpr):
    """Apply the pipeline's transforms to rows of x (N, D): returns (y (BT, DP) fp32, norm (BT,)).

    NSEP: 0 none, 1 before the rotation, 2 after it. The rotation y = x @ R is an fp32 ("ieee")
    tl.dot over BK-wide chunks of the reduction dim, R (D, D) row-major fp32.
    """
    cols = tl.arange(0, DP)
    n = tl.zeros((BT,), tl.float32)
    if HAS_ROT:
        if NSEP == 1:
            _, n = unit_rows(load_rows(x_ptr, rows, rmask, cols, D))
            safe = tl.where(n > 0, n, 1.0)
        y = tl.zeros((BT, DP), tl.float32)
        for k0 in tl.static_range(0, DP, BK):
            kc = k0 + tl.arange(0, BK)
            xk = load_rows(x_ptr, rows, rmask, kc, D)
            if NSEP == 1:
                xk = tl.where(n[:, None] > 0, tl.math.div_rn(xk, safe[:, None]), 0.0)
            rmat = tl.load(r_ptr + kc[:, None] * D + cols[None, :],
                           mask=(kc < D)[:, None] & (cols < D)[None, :], other=0.0)
            y += tl.dot(xk, rmat, input_precision="ieee")
        if NSEP == 2:
            y, n = unit_rows(y)
    else:
        y = load_rows(x_ptr, rows, rmask, cols, D)
        if NSEP != 0:
            y, n = unit_rows(y)
    return y, n


@triton.jit
def quantize_codes(y, s32, z32, BITS: tl.constexpr, ASYM: tl.constexpr):
    """Unsigned integer codes (int32) of y given float32 scale s32 and zero z32 (broadcastable).

    sym: round(y / s).clamp(-qmax, qmax) + qmax; asym: round((y - z) / s).clamp(0, 2**b - 1);
    s == 0 divides by 1.
    """
    safe = tl.where(s32 == 0, 1.0, s32)
    if ASYM:
        levels: tl.constexpr = (1 << BITS) - 1
        v = tl.math.div_rn(y - z32, safe)
        v = tl.minimum(tl.maximum(v, -1.0), levels + 1.0)
        q = tl.minimum(tl.maximum(round_half_even(v), 0.0), levels * 1.0)
    else:
        qmax: tl.constexpr = (1 << (BITS - 1)) - 1
        v = tl.math.div_rn(y, safe)
        v = tl.minimum(tl.maximum(v, -qmax - 1.0), qmax + 1.0)
        q = tl.minimum(tl.maximum(round_half_even(v), -qmax * 1.0), qmax * 1.0) + qmax
    return q.to(tl.int32)


@triton.jit
def dequantize_codes(u, s32, z32, OFF: tl.constexpr, ASYM: tl.constexpr):
    """float32 values of codes u: (u - OFF) * s (sym; OFF = qmax, or 8 / 128 for q4_0 / q8_0)
    or u * s + z (asym, q4_1)."""
    if ASYM:
        return u.to(tl.float32) * s32 + z32
    else:
        return (u - OFF).to(tl.float32) * s32


@triton.jit
def pack_store(codes_ptr, rows, rmask, u, RB,
               BT: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr):
    """Bit-pack codes u (BT, DP) int32 into rows of codes (N, RB) uint8 (contract layout).

    u must be 0 on padded channels. int8: one code per byte; int2/int4: 8 // BITS codes per byte,
    one dense (BT, DP * BITS // 8) store; int3: every 8 codes form a little-endian 24-bit word
    stored as 3 bytes.
    """
    if BITS == 8:
        cols = tl.arange(0, DP)
        tl.store(codes_ptr + rows[:, None] * RB + cols[None, :], u.to(tl.uint8),
                 mask=rmask[:, None] & (cols < RB)[None, :])
    elif BITS == 3:
        u3 = tl.reshape(u, (BT, DP // 8, 8))
        word = tl.sum(u3 << (tl.arange(0, 8) * 3)[None, None, :], axis=2)
        jb = tl.arange(0, 4)
        byte = (word[:, :, None] >> (jb * 8)[None, None, :]) & 255
        k8 = tl.arange(0, DP // 8)
        offs = rows[:, None, None] * RB + (k8 * 3)[None, :, None] + jb[None, None, :]
        mask = rmask[:, None, None] & (k8 * 3 < RB)[None, :, None] & (jb < 3)[None, None, :]
        tl.store(codes_ptr + offs, byte.to(tl.uint8), mask=mask)
    else:
        PER: tl.constexpr = 8 // BITS
        u3 = tl.reshape(u, (BT, DP // PER, PER))
        byte = tl.sum(u3 << (tl.arange(0, PER) * BITS)[None, None, :], axis=2)  # sum == or
        cols = tl.arange(0, DP // PER)
        tl.store(codes_ptr + rows[:, None] * RB + cols[None, :], byte.to(tl.uint8),
                 mask=rmask[:, None] & (cols < RB)[None, :])


@triton.jit
def unpack_load(codes_ptr, rows, rmask, cols, D, RB, BITS: tl.constexpr):
    """Codes (BT, K) int32 of rows at channels cols from the packed (N, RB) uint8 rows."""
    bit = cols * BITS
    byte = bit >> 3
    cmask = rmask[:, None] & (cols < D)[None, :]
    base = codes_ptr + rows[:, None] * RB + byte[None, :]
    lo = tl.load(base, mask=cmask, other=0).to(tl.int32)
    if BITS == 3:  # a code may straddle two bytes
        hi = tl.load(base + 1, mask=cmask & ((byte + 1) < RB)[None, :], other=0).to(tl.int32)
        lo = lo | (hi << 8)
    return (lo >> (bit & 7)[None, :]) & ((1 << BITS) - 1)
