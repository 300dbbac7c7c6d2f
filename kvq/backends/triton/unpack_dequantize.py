"""Fused unpack + dequantize + inverse-transform kernel and its host launcher.

One program = BT rows of the (B*H*T, D) output. Every granularity reads its scale/zero through one
index: meta row = bh * NT + t // TGS, meta column = channel // CGS, for meta shaped (B*H, NT, NC):
ptok (NT=T, NC=1, TGS=1, CGS=DP), group(g, channel) (T, D/g, 1, g), pchan (1, D, T, 1),
group(g, token) (ceil(T/g), D, g, 1), phead (1, 1, T, DP). Float formats and scaled codebooks
decode through `float_formats.py` (fp4(nv) reads its tensor scale per (batch, head)).
The inverse rotation is an fp32 tl.dot with R^T over BK-wide column chunks; nsep renormalises
after it (||dq @ R^T|| = ||dq|| up to rounding, so this equals the reference's order for
rot>nsep within float32 rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvq.backends.triton.common import (
    cast_rne,
    dequantize_codes,
    is_interpreted,
    launch,
    launch_options,
    padded_dim,
    row_bytes,
    tiles,
    to_float32,
    unit_rows,
    unpack_load,
)
from kvq.backends.triton.float_formats import format_unscale, format_values
from kvq.backends.triton.plan import KernelPlan


@triton.jit
def _dequant_cols(codes_ptr, scale_ptr, zero_ptr, levels_ptr, rows, rmask, mrow, tsc, cols, D,
                  RB, NC, CGS, BITS: tl.constexpr, ASYM: tl.constexpr, OFF: tl.constexpr,
                  FMT: tl.constexpr, SCALED: tl.constexpr):
    """(BT, K) float32 dequantized values of rows at channels cols (0 on padding).
    tsc (BT,): fp4(nv)'s tensor scale of each row's head."""
    u = unpack_load(codes_ptr, rows, rmask, cols, D, RB, BITS)
    mask = rmask[:, None] & (cols < D)[None, :]
    moffs = mrow[:, None] * NC + (cols // CGS)[None, :]
    if FMT >= 4:
        v = format_values(u, levels_ptr, mask, FMT)
        if SCALED:
            s = tl.load(scale_ptr + moffs, mask=mask, other=0)
            v = v * format_unscale(s, tsc[:, None], FMT)
        return v
    s = to_float32(tl.load(scale_ptr + moffs, mask=mask, other=0.0))
    z = s
    if ASYM:
        z = to_float32(tl.load(zero_ptr + moffs, mask=mask, other=0.0))
    return dequantize_codes(u, s, z, OFF, ASYM)


@triton.jit
def _dequantize_kernel(
    codes_ptr, norm_ptr, scale_ptr, zero_ptr, r_ptr, out_ptr, levels_ptr, tsc_ptr,
    N, T, D, RB, NT, NC, TGS, CGS,
    BT: tl.constexpr, DP: tl.constexpr, BK: tl.constexpr, NSEP: tl.constexpr,
    RENORM: tl.constexpr, HAS_ROT: tl.constexpr, BITS: tl.constexpr, ASYM: tl.constexpr,
    OFF: tl.constexpr, FMT: tl.constexpr = 0, SCALED: tl.constexpr = True,
):
    """codes (N, RB) uint8 + meta -> out (N, D) in out's dtype. levels_ptr: lloyd's levels;
    tsc_ptr: fp4(nv)'s tensor scales (B*H,)."""
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = rows < N
    mrow = (rows // T) * NT + (rows % T) // TGS
    tsc = tl.zeros((BT,), tl.float32)
    if FMT == 8:
        tsc = tl.load(tsc_ptr + rows // T, mask=rmask, other=0.0)
    cols = tl.arange(0, DP)
    if HAS_ROT:
        y = tl.zeros((BT, DP), tl.float32)
        for k0 in tl.static_range(0, DP, BK):
            kc = k0 + tl.arange(0, BK)
            dq = _dequant_cols(codes_ptr, scale_ptr, zero_ptr, levels_ptr, rows, rmask, mrow,
                               tsc, kc, D, RB, NC, CGS, BITS, ASYM, OFF, FMT, SCALED)
            rt = tl.load(r_ptr + cols[None, :] * D + kc[:, None],  # R^T[k, j] = R[j, k]
                         mask=(kc < D)[:, None] & (cols < D)[None, :], other=0.0)
            y += tl.dot(dq, rt, input_precision="ieee")
    else:
        y = _dequant_cols(codes_ptr, scale_ptr, zero_ptr, levels_ptr, rows, rmask, mrow, tsc,
                          cols, D, RB, NC, CGS, BITS, ASYM, OFF, FMT, SCALED)
    if NSEP != 0:
        n = to_float32(tl.load(norm_ptr + rows, mask=rmask, other=0.0))
        if RENORM:
            y, _ = unit_rows(y)
        y = y * n[:, None]
    mask = rmask[:, None] & (cols < D)[None, :]
    out = cast_rne(y, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out, mask=mask)


def unpack_dequantize(plan: KernelPlan, codes: torch.Tensor, meta: dict[str, torch.Tensor],
                      shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_pack`: codes (B, H, T, RB) + meta -> x_hat (B, H, T, D) in dtype."""
    B, H, T, D = shape
    dp, rb, dev = padded_dim(D), row_bytes(D, plan.bits), codes.device
    scale = meta["scale"].contiguous() if plan.scaled else codes
    zero = meta["zero"].contiguous() if plan.asym else scale
    norm = meta["norm"].contiguous() if plan.nsep else scale
    levels = plan.levels(D, dev) if plan.codebook is not None else scale
    tsc = meta["tensor_scale"].contiguous() if plan.fmt == "nv" else scale
    if plan.gran == "ptok" or not plan.scaled:
        nt, nc, tgs, cgs = T, 1, 1, dp
    elif plan.gran == "group_channel":
        nt, nc, tgs, cgs = T, D // plan.group, 1, plan.group
    elif plan.gran == "pchan":
        nt, nc, tgs, cgs = 1, D, T, 1
    elif plan.gran == "phead":
        nt, nc, tgs, cgs = 1, 1, T, dp
    else:
        nt, nc, tgs, cgs = -(-T // plan.group), D, plan.group, 1
    rmat = plan.rotation(D, dev) if plan.rot else scale
    out = torch.empty(shape, dtype=dtype, device=dev)
    n = B * H * T
    bt, bk = tiles(n, dp, is_interpreted(_dequantize_kernel))
    launch(
        _dequantize_kernel, (triton.cdiv(n, bt),), codes.contiguous(), norm, scale, zero, rmat,
        out, levels, tsc, n, T, D, rb, nt, nc, tgs, cgs,
        BT=bt, DP=dp, BK=bk, NSEP=plan.nsep, RENORM=plan.renorm, HAS_ROT=plan.rot is not None,
        BITS=plan.bits, ASYM=plan.asym, OFF=plan.offset, FMT=plan.fmt_code, SCALED=plan.scaled,
        **launch_options(bt, dp),
    )
    return out
