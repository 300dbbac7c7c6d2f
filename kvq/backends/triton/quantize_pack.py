"""Fused transform + quantize + bit-pack kernels and their host launcher.

Two kernels share the helpers in `common`:
- `_quantize_rows_kernel`: statistics within a row (ptok; group(g, channel)). One program = BT
  rows of x viewed as (B*H*T, D); single pass.
- `_quantize_tokens_kernel`: statistics over tokens (pchan over all T; group(g, token) over blocks
  of g tokens). One program = one (b, h, token block); pass 1 reduces per-channel min/max/absmax
  over the block in BT-token tiles, pass 2 recomputes the transforms and quantizes (one pass when
  the block fits in one tile).
Each program writes status bits: 1 = NaN/Inf in the (transformed) input, 2 = a stored
norm/scale/zero is not finite (e.g. it overflows float16); the backend then raises the torch
reference's error. Checking the input in the kernel saves the separate isfinite pass.
"""

from __future__ import annotations

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
    quantize_codes,
    row_bytes,
    tiles,
    token_tiles,
)
from kvq.backends.triton.plan import KernelPlan


@triton.jit
def _flag(v, mask, BIT: tl.constexpr):
    """BIT (int32) when some value of v under the broadcast mask is NaN or Inf, else 0."""
    bad = (tl.abs(v.to(tl.float32)) == float("inf")) | (v != v)
    return tl.max(tl.ravel(tl.where(mask, bad, 0).to(tl.int32)), axis=0) * BIT


@triton.jit
def _store_norm(norm_ptr, rows, rmask, n, NSEP: tl.constexpr):
    """Store the nsep norms of these rows; return the status bits (2: a norm overflowed)."""
    flag = tl.full((), 0, tl.int32)
    if NSEP != 0:
        n_m = cast_rne(n, norm_ptr.dtype.element_ty)
        tl.store(norm_ptr + rows, n_m, mask=rmask)
        flag = _flag(n_m, rmask, 2)
    return flag


@triton.jit
def _quantize_rows_kernel(
    x_ptr, r_ptr, codes_ptr, norm_ptr, scale_ptr, zero_ptr, flag_ptr, N, D, RB, NM,
    BT: tl.constexpr, DP: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr,
    NSEP: tl.constexpr, HAS_ROT: tl.constexpr, BITS: tl.constexpr, ASYM: tl.constexpr,
):
    """x (N, D) -> codes (N, RB), scale/zero (N, NM), norm (N,); GS = group along channels.

    NM = D // GS meta columns (1 for ptok, where GS = DP covers the whole padded row).
    """
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < N
    y, n = load_transformed(x_ptr, r_ptr, rows, rmask, D, BT, DP, BK, NSEP, HAS_ROT)
    flag = _store_norm(norm_ptr, rows, rmask, n, NSEP) | _flag(y, rmask[:, None], 1)

    NG: tl.constexpr = DP // GS
    col3 = tl.arange(0, NG)[:, None] * GS + tl.arange(0, GS)[None, :]  # (NG, GS)
    valid3 = (col3 < D)[None, :, :]
    y3 = tl.reshape(y, (BT, NG, GS))
    if ASYM:
        gvalid = (tl.arange(0, NG) < NM)[None, :]  # all-padding groups: keep them finite
        mn = tl.where(gvalid, tl.min(tl.where(valid3, y3, float("inf")), axis=2), 0.0)
        mx = tl.where(gvalid, tl.max(tl.where(valid3, y3, -float("inf")), axis=2), 0.0)
        s = tl.math.div_rn(mx - mn, (1 << BITS) - 1.0)
        z_m = cast_rne(mn, zero_ptr.dtype.element_ty)
        z32 = z_m.to(tl.float32)
    else:
        s = tl.math.div_rn(tl.max(tl.abs(y3), axis=2), (1 << (BITS - 1)) - 1.0)
        z32 = tl.zeros((BT, NG), tl.float32)
    s_m = cast_rne(s, scale_ptr.dtype.element_ty)
    u3 = quantize_codes(y3, s_m.to(tl.float32)[:, :, None], z32[:, :, None], BITS, ASYM)
    u = tl.reshape(tl.where(valid3, u3, 0), (BT, DP))
    pack_store(codes_ptr, rows, rmask, u, RB, BT, DP, BITS)

    g = tl.arange(0, NG)
    moffs = rows[:, None] * NM + g[None, :]
    mmask = rmask[:, None] & (g < NM)[None, :]
    tl.store(scale_ptr + moffs, s_m, mask=mmask)
    flag = flag | _flag(s_m, mmask, 2)
    if ASYM:
        tl.store(zero_ptr + moffs, z_m, mask=mmask)
        flag = flag | _flag(z_m, mmask, 2)
    tl.store(flag_ptr + tl.program_id(0), flag)


@triton.jit
def _fold_stats(y, m, AXIS: tl.constexpr):
    """absmax / min / max of y over AXIS, ignoring entries where the broadcast mask m is False."""
    amax = tl.max(tl.where(m, tl.abs(y), 0.0), axis=AXIS)
    mn = tl.min(tl.where(m, y, float("inf")), axis=AXIS)
    mx = tl.max(tl.where(m, y, -float("inf")), axis=AXIS)
    return amax, mn, mx


@triton.jit
def _block_scale(scale_ptr, zero_ptr, offs, mask, amax, mn, mx, BITS: tl.constexpr,
                 ASYM: tl.constexpr):
    """Store the block's per-channel scale (and zero); return (s32, z32, status bits)."""
    flag = tl.full((), 0, tl.int32)
    if ASYM:
        mn = tl.where(mask, mn, 0.0)  # padded channels: keep them finite
        mx = tl.where(mask, mx, 0.0)
        s = tl.math.div_rn(mx - mn, (1 << BITS) - 1.0)
        z_m = cast_rne(mn, zero_ptr.dtype.element_ty)
        tl.store(zero_ptr + offs, z_m, mask=mask)
        flag = _flag(z_m, mask, 2)
        z32 = z_m.to(tl.float32)
    else:
        s = tl.math.div_rn(amax, (1 << (BITS - 1)) - 1.0)
        z32 = tl.zeros_like(amax)
    s_m = cast_rne(s, scale_ptr.dtype.element_ty)
    tl.store(scale_ptr + offs, s_m, mask=mask)
    return s_m.to(tl.float32), z32, flag | _flag(s_m, mask, 2)


@triton.jit
def _quantize_tokens_kernel(
    x_ptr, r_ptr, codes_ptr, norm_ptr, scale_ptr, zero_ptr, flag_ptr, T, D, RB, TG, NBLK,
    BT: tl.constexpr, DP: tl.constexpr, BK: tl.constexpr, G: tl.constexpr,
    NSEP: tl.constexpr, HAS_ROT: tl.constexpr, BITS: tl.constexpr, ASYM: tl.constexpr,
    SINGLE: tl.constexpr,
):
    """x (B*H, T, D) -> codes, per-channel scale/zero (B*H, NBLK, D) over TG-token blocks.

    SINGLE: program (bh, i) quantizes tokens [i*BT, (i+1)*BT) = BT // G whole blocks of G = TG
    tokens (pchan: one block, G = BT >= T) in one pass. Otherwise program (bh, i) owns block i
    and streams it in BT-token tiles twice (statistics, then quantize + pack).
    """
    bh = tl.program_id(0)
    cols = tl.arange(0, DP)
    cmask = cols < D
    if SINGLE:
        NB: tl.constexpr = BT // G
        t = tl.program_id(1) * BT + tl.arange(0, BT)
        rmask = t < T
        rows = bh * T + t
        y, n = load_transformed(x_ptr, r_ptr, rows, rmask, D, BT, DP, BK, NSEP, HAS_ROT)
        flag = _store_norm(norm_ptr, rows, rmask, n, NSEP) | _flag(y, rmask[:, None], 1)
        y3 = tl.reshape(y, (NB, G, DP))
        amax, mn, mx = _fold_stats(y3, tl.reshape(rmask, (NB, G))[:, :, None], 1)
        blk = tl.program_id(1) * NB + tl.arange(0, NB)
        offs = (bh * NBLK + blk)[:, None] * D + cols[None, :]
        mask = (blk < NBLK)[:, None] & cmask[None, :]
        s32, z32, f = _block_scale(scale_ptr, zero_ptr, offs, mask, amax, mn, mx, BITS, ASYM)
        u = tl.reshape(quantize_codes(y3, s32[:, None, :], z32[:, None, :], BITS, ASYM), (BT, DP))
        pack_store(codes_ptr, rows, rmask, tl.where(cmask[None, :], u, 0), RB, BT, DP, BITS)
    else:
        blk = tl.program_id(1)
        t_start = blk * TG
        t_end = tl.minimum(t_start + TG, T)
        amax = tl.zeros((DP,), tl.float32)
        mn = tl.full((DP,), float("inf"), tl.float32)
        mx = tl.full((DP,), -float("inf"), tl.float32)
        flag = tl.full((), 0, tl.int32)
        for t0 in range(t_start, t_end, BT):
            t = t0 + tl.arange(0, BT)
            rmask = t < t_end
            rows = bh * T + t
            y, n = load_transformed(x_ptr, r_ptr, rows, rmask, D, BT, DP, BK, NSEP, HAS_ROT)
            flag = flag | _store_norm(norm_ptr, rows, rmask, n, NSEP) | _flag(y, rmask[:, None], 1)
            a, lo, hi = _fold_stats(y, rmask[:, None], 0)
            amax, mn, mx = tl.maximum(amax, a), tl.minimum(mn, lo), tl.maximum(mx, hi)
        offs = (bh * NBLK + blk) * D + cols
        s32, z32, f = _block_scale(scale_ptr, zero_ptr, offs, cmask, amax, mn, mx, BITS, ASYM)
        for t0 in range(t_start, t_end, BT):
            t = t0 + tl.arange(0, BT)
            rmask = t < t_end
            rows = bh * T + t
            y, n = load_transformed(x_ptr, r_ptr, rows, rmask, D, BT, DP, BK, NSEP, HAS_ROT)
            u = quantize_codes(y, s32[None, :], z32[None, :], BITS, ASYM)
            pack_store(codes_ptr, rows, rmask, tl.where(cmask[None, :], u, 0), RB, BT, DP, BITS)
    tl.store(flag_ptr + bh * tl.num_programs(1) + tl.program_id(1), flag | f)


def quantize_pack(plan: KernelPlan, x: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Run the plan on x (B, H, T, D) -> (codes (B, H, T, RB) uint8, meta, status bits).

    meta holds "norm" (B, H, T, 1) for nsep, "scale" and, when asymmetric, "zero" in the
    granularity's layout. Status (one host sync): 1 = NaN/Inf input, 2 = non-finite metadata.
    """
    B, H, T, D = x.shape
    x = x.contiguous()
    dp, rb, dev = padded_dim(D), row_bytes(D, plan.bits), x.device
    codes = torch.empty((B, H, T, rb), dtype=torch.uint8, device=dev)
    meta: dict[str, torch.Tensor] = {}
    if plan.nsep:
        meta["norm"] = torch.empty((B, H, T, 1), dtype=plan.norm_dtype, device=dev)
    rmat = plan.rot(D).to(device=dev, dtype=torch.float32).contiguous() if plan.rot else x
    if plan.token_axis:
        kernel = _quantize_tokens_kernel
        tg = T if plan.gran == "pchan" else plan.group
        nblk = -(-T // tg)
        bt, g, single = token_tiles(T, tg, dp, is_interpreted(kernel))
        bk = tiles(1, dp, is_interpreted(kernel))[1]
        mshape, grid = (B, H, nblk, D), (B * H, triton.cdiv(T, bt) if single else nblk)
        args, extra = (T, D, rb, tg, nblk), dict(G=g, SINGLE=single)
    else:
        gs = dp if plan.gran == "ptok" else plan.group
        nm = 1 if plan.gran == "ptok" else D // gs
        kernel, mshape = _quantize_rows_kernel, (B, H, T, nm)
        bt, bk = tiles(B * H * T, dp, is_interpreted(kernel))
        grid = (triton.cdiv(B * H * T, bt),)
        args, extra = (B * H * T, D, rb, nm), dict(GS=gs)
    meta["scale"] = torch.empty(mshape, dtype=plan.meta_dtype, device=dev)
    if plan.asym:
        meta["zero"] = torch.empty(mshape, dtype=plan.meta_dtype, device=dev)
    flags = torch.zeros(grid[0] * (grid[1] if len(grid) > 1 else 1), dtype=torch.int32, device=dev)
    launch(kernel, grid, x, rmat, codes, meta.get("norm", codes), meta["scale"],
           meta.get("zero", codes), flags, *args, BT=bt, DP=dp, BK=bk, NSEP=plan.nsep,
           HAS_ROT=plan.rot is not None, BITS=plan.bits, ASYM=plan.asym, **extra,
           **launch_options(bt, dp))
    nonfinite, overflow = torch.stack([(flags & 1).any(), (flags & 2).any()]).tolist()
    return codes, meta, int(nonfinite) | int(overflow) << 1
