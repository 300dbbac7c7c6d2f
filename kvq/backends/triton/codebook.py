"""Fused kernels for unscaled codebook quantizers (``[nsep][rot] > lloyd(b)(none)``, TurboQuant).

Quantize: one program = BT rows of x viewed as (B*H*T, D): transforms (shared with the integer
kernels), code = #{midpoints m : y >= m} (the torch reference's ``bucketize(right=True)``),
bit-pack. Dequantize: unpack, look the levels up, inverse rotation (fp32 ``tl.dot`` with R^T),
nsep re-normalisation and norm. The levels come from the step's own ``codebook(head_dim)``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvq.backends.triton.common import (
    cast_rne,
    is_interpreted,
    launch,
    launch_options,
    load_transformed,
    pack_store,
    padded_dim,
    row_bytes,
    tiles,
    to_float32,
    unit_rows,
    unpack_load,
)
from kvq.backends.triton.plan import KernelPlan
from kvq.backends.triton.quantize_pack import _flag, _store_norm


@triton.jit
def _codebook_quantize_kernel(
    x_ptr, r_ptr, codes_ptr, norm_ptr, mids_ptr, flag_ptr, N, D, RB,
    BT: tl.constexpr, DP: tl.constexpr, BK: tl.constexpr,
    NSEP: tl.constexpr, HAS_ROT: tl.constexpr, BITS: tl.constexpr,
):
    """x (N, D) -> codes (N, RB), norm (N,); mids: the 2**BITS - 1 sorted midpoints (fp32)."""
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = rows < N
    y, n = load_transformed(x_ptr, r_ptr, rows, rmask, D, BT, DP, BK, NSEP, HAS_ROT)
    flag = _store_norm(norm_ptr, rows, rmask, n, NSEP) | _flag(y, rmask[:, None], 1)
    u = tl.zeros((BT, DP), tl.int32)
    for i in tl.static_range((1 << BITS) - 1):
        u += (y >= tl.load(mids_ptr + i)).to(tl.int32)
    cols = tl.arange(0, DP)
    pack_store(codes_ptr, rows, rmask, tl.where((cols < D)[None, :], u, 0), RB, BT, DP, BITS)
    tl.store(flag_ptr + tl.program_id(0), flag)


@triton.jit
def _levels_cols(codes_ptr, levels_ptr, rows, rmask, cols, D, RB, BITS: tl.constexpr):
    """(BT, K) float32 levels of rows at channels cols (0 on padding)."""
    u = unpack_load(codes_ptr, rows, rmask, cols, D, RB, BITS)
    return tl.load(levels_ptr + u, mask=rmask[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def _codebook_dequantize_kernel(
    codes_ptr, norm_ptr, levels_ptr, r_ptr, out_ptr, N, D, RB,
    BT: tl.constexpr, DP: tl.constexpr, BK: tl.constexpr, NSEP: tl.constexpr,
    RENORM: tl.constexpr, HAS_ROT: tl.constexpr, BITS: tl.constexpr,
):
    """codes (N, RB) uint8 + norm -> out (N, D) in out's dtype."""
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = rows < N
    cols = tl.arange(0, DP)
    if HAS_ROT:
        y = tl.zeros((BT, DP), tl.float32)
        for k0 in tl.static_range(0, DP, BK):
            kc = k0 + tl.arange(0, BK)
            c = _levels_cols(codes_ptr, levels_ptr, rows, rmask, kc, D, RB, BITS)
            rt = tl.load(r_ptr + cols[None, :] * D + kc[:, None],  # R^T[k, j] = R[j, k]
                         mask=(kc < D)[:, None] & (cols < D)[None, :], other=0.0)
            y += tl.dot(c, rt, input_precision="ieee")
    else:
        y = _levels_cols(codes_ptr, levels_ptr, rows, rmask, cols, D, RB, BITS)
    if NSEP != 0:
        n = to_float32(tl.load(norm_ptr + rows, mask=rmask, other=0.0))
        if RENORM:
            y, _ = unit_rows(y)
        y = y * n[:, None]
    out = cast_rne(y, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out,
             mask=rmask[:, None] & (cols < D)[None, :])


def quantize_codebook(plan: KernelPlan, x: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """x (B, H, T, D) -> (codes (B, H, T, RB) uint8, {"norm"} for nsep, status bits)."""
    B, H, T, D = x.shape
    x = x.contiguous()
    dp, rb, dev = padded_dim(D), row_bytes(D, plan.bits), x.device
    codes = torch.empty((B, H, T, rb), dtype=torch.uint8, device=dev)
    meta = {}
    if plan.nsep:
        meta["norm"] = torch.empty((B, H, T, 1), dtype=plan.norm_dtype, device=dev)
    levels = plan.levels(D, dev)
    mids = ((levels[1:] + levels[:-1]) / 2).contiguous()
    rmat = plan.rotation(D, dev) if plan.rot else x
    n = B * H * T
    bt, bk = tiles(n, dp, is_interpreted(_codebook_quantize_kernel))
    grid = (triton.cdiv(n, bt),)
    flags = torch.zeros(math.prod(grid), dtype=torch.int32, device=dev)
    launch(_codebook_quantize_kernel, grid, x, rmat, codes, meta.get("norm", codes), mids, flags,
           n, D, rb, BT=bt, DP=dp, BK=bk, NSEP=plan.nsep, HAS_ROT=plan.rot is not None,
           BITS=plan.bits, **launch_options(bt, dp))
    nonfinite, overflow = torch.stack([(flags & 1).any(), (flags & 2).any()]).tolist()
    return codes, meta, int(nonfinite) | int(overflow) << 1


def dequantize_codebook(plan: KernelPlan, codes: torch.Tensor, meta: dict[str, torch.Tensor],
                        shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_codebook` -> x_hat (B, H, T, D) in dtype."""
    B, H, T, D = shape
    dp, rb, dev = padded_dim(D), row_bytes(D, plan.bits), codes.device
    levels = plan.levels(D, dev)
    norm = meta["norm"].contiguous() if plan.nsep else levels
    rmat = plan.rotation(D, dev) if plan.rot else levels
    out = torch.empty(shape, dtype=dtype, device=dev)
    n = B * H * T
    bt, bk = tiles(n, dp, is_interpreted(_codebook_dequantize_kernel))
    launch(_codebook_dequantize_kernel, (triton.cdiv(n, bt),), codes.contiguous(), norm, levels,
           rmat, out, n, D, rb, BT=bt, DP=dp, BK=bk, NSEP=plan.nsep, RENORM=plan.renorm,
           HAS_ROT=plan.rot is not None, BITS=plan.bits, **launch_options(bt, dp))
    return out
