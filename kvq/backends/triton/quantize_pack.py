"""Fused transform + quantize + bit-pack kernels and their host launcher.

- `_quantize_rows_kernel`: statistics within a row (ptok; group(g, channel)). One program = BT
  rows of x viewed as (B*H*T, D); one pass.
- `_quantize_tokens_kernel` with SINGLE: statistics over tokens (pchan; group(g, token)) when
  whole token blocks fit in a tile: one program quantizes BT // g blocks in one pass.
- Otherwise (pchan over a long sequence, big or non-power-of-two token groups) two passes over
  all tiles in parallel: `_token_stats_kernel` folds each tile's per-channel absmax/min/max
  into a float32 buffer with atomics (max/min are exact in any order), then
  `_quantize_tokens_kernel` recomputes the transforms of its tile and quantizes.
Programs write status bits: 1 = NaN/Inf in the (transformed) input, 2 = a stored
norm/scale/zero is not finite (e.g. it overflows float16), or a llama.cpp block would dequantize
past float16's maximum; the backend raises for them (through the reference's error)."""

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
    quantize_codes,
    row_bytes,
    tiles,
    token_tiles,
)
from kvq.backends.triton.ggml_blocks import ggml_block_codes, ggml_fp16_overflow
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
    FMT: tl.constexpr = 0,
):
    """x (N, D) -> codes (N, RB), scale/zero (N, NM), norm (N,); GS = group along channels.

    NM = D // GS meta columns (1 for ptok, where GS = DP covers the whole padded row).
    FMT: 0 kvq's int quantizer, else a llama.cpp block format (`ggml_blocks.FORMATS`).
    """
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = rows < N
    y, n = load_transformed(x_ptr, r_ptr, rows, rmask, D, BT, DP, BK, NSEP, HAS_ROT)
    flag = _store_norm(norm_ptr, rows, rmask, n, NSEP) | _flag(y, rmask[:, None], 1)

    NG: tl.constexpr = DP // GS
    col3 = tl.arange(0, NG)[:, None] * GS + tl.arange(0, GS)[None, :]  # (NG, GS)
    valid3 = (col3 < D)[None, :, :]
    y3 = tl.reshape(y, (BT, NG, GS))
    gvalid = (tl.arange(0, NG) < NM)[None, :]  # all-padding groups: keep them finite
    if FMT != 0:
        s, mn, u3 = ggml_block_codes(y3, valid3, gvalid, FMT, GS)
        s_m = cast_rne(s, scale_ptr.dtype.element_ty)
        z_m = s_m
        if ASYM:  # q4_1 stores the block minimum
            z_m = cast_rne(mn, zero_ptr.dtype.element_ty)
        over = ggml_fp16_overflow(y3, valid3, s_m.to(tl.float32), z_m.to(tl.float32), FMT)
        flag = flag | tl.max(tl.ravel(tl.where(over & rmask[:, None], 2, 0)), axis=0)
    else:
        if ASYM:
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
def _block_scale(amax, mn, mx, mask, scale_ptr, zero_ptr, BITS: tl.constexpr, ASYM: tl.constexpr):
    """Scale (and zero) of token blocks from their statistics, at the metadata dtypes: (s, z)."""
    if ASYM:
        mn = tl.where(mask, mn, 0.0)  # padded channels: keep them finite
        mx = tl.where(mask, mx, 0.0)
        s = cast_rne(tl.math.div_rn(mx - mn, (1 << BITS) - 1.0), scale_ptr.dtype.element_ty)
        return s, cast_rne(mn, zero_ptr.dtype.element_ty)
    else:
        s = cast_rne(tl.math.div_rn(amax, (1 << (BITS - 1)) - 1.0), scale_ptr.dtype.element_ty)
        return s, s


@triton.jit
def _store_scale(scale_ptr, zero_ptr, offs, mask, s, z, ASYM: tl.constexpr):
    """Store scale (and zero) under mask; return the status bits (2: not finite)."""
    tl.store(scale_ptr + offs, s, mask=mask)
    flag = _flag(s, mask, 2)
    if ASYM:
        tl.store(zero_ptr + offs, z, mask=mask)
        flag = flag | _flag(z, mask, 2)
    return flag


@triton.jit
def _block_tile(blk, j, T, TG, BT: tl.constexpr):
    """Tokens of tile j of token block blk (TG tokens from blk * TG) and their mask."""
    t = blk * TG + j * BT + tl.arange(0, BT)
    return t, (t < blk * TG + TG) & (t < T)


@triton.jit
def _token_stats_kernel(
    x_ptr, r_ptr, norm_ptr, stats_ptr, flag_ptr, T, D, TG, NSTAT,
    BT: tl.constexpr, DP: tl.constexpr, BK: tl.constexpr,
    NSEP: tl.constexpr, HAS_ROT: tl.constexpr, ASYM: tl.constexpr,
):
    """Pass 1 of streamed token blocks: program (bh, blk, j) folds tile j of block blk into
    stats (3, NSTAT = B*H*NBLK*DP) float32 (absmax, min, max) with atomics, exact in any order."""
    bh, blk, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t, rmask = _block_tile(blk, j, T, TG, BT)
    rows = (bh * T + t).to(tl.int64)
    y, n = load_transformed(x_ptr, r_ptr, rows, rmask, D, BT, DP, BK, NSEP, HAS_ROT)
    flag = _store_norm(norm_ptr, rows, rmask, n, NSEP) | _flag(y, rmask[:, None], 1)
    amax, mn, mx = _fold_stats(y, rmask[:, None], 0)
    offs = (bh * tl.num_programs(1) + blk) * DP + tl.arange(0, DP)
    if ASYM:
        tl.atomic_min(stats_ptr + NSTAT + offs, mn)
        tl.atomic_max(stats_ptr + 2 * NSTAT + offs, mx)
    else:
        tl.atomic_max(stats_ptr + offs, amax)
    tl.store(flag_ptr + (bh * tl.num_programs(1) + blk) * tl.num_programs(2) + j, flag)


@triton.jit
def _quantize_tokens_kernel(
    x_ptr, r_ptr, codes_ptr, norm_ptr, scale_ptr, zero_ptr, stats_ptr, flag_ptr,
    T, D, RB, TG, NBLK, NSTAT,
    BT: tl.constexpr, DP: tl.constexpr, BK: tl.constexpr, G: tl.constexpr,
    NSEP: tl.constexpr, HAS_ROT: tl.constexpr, BITS: tl.constexpr, ASYM: tl.constexpr,
    SINGLE: tl.constexpr,
):
    """x (B*H, T, D) -> codes, per-channel scale/zero (B*H, NBLK, D) over TG-token blocks.

    SINGLE: program (bh, i) quantizes tokens [i*BT, (i+1)*BT) = BT // G whole blocks of G = TG
    tokens (pchan: one block, G = BT >= T) in one pass. Otherwise (pass 2 of streamed blocks)
    program (bh, blk, j) quantizes tile j of block blk with the statistics that
    `_token_stats_kernel` gathered; the j == 0 programs store the block's scale/zero.
    """
    bh = tl.program_id(0)
    cols = tl.arange(0, DP)
    cmask = cols < D
    if SINGLE:
        NB: tl.constexpr = BT // G
        t = tl.program_id(1) * BT + tl.arange(0, BT)
        rmask = t < T
        rows = (bh * T + t).to(tl.int64)
        y, n = load_transformed(x_ptr, r_ptr, rows, rmask, D, BT, DP, BK, NSEP, HAS_ROT)
        flag = _store_norm(norm_ptr, rows, rmask, n, NSEP) | _flag(y, rmask[:, None], 1)
        y3 = tl.reshape(y, (NB, G, DP))
        amax, mn, mx = _fold_stats(y3, tl.reshape(rmask, (NB, G))[:, :, None], 1)
        blk = tl.program_id(1) * NB + tl.arange(0, NB)
        offs = (bh * NBLK + blk)[:, None] * D + cols[None, :]
        mask = (blk < NBLK)[:, None] & cmask[None, :]
        s, z = _block_scale(amax, mn, mx, mask, scale_ptr, zero_ptr, BITS, ASYM)
        flag = flag | _store_scale(scale_ptr, zero_ptr, offs, mask, s, z, ASYM)
        s32, z32 = s.to(tl.float32)[:, None, :], z.to(tl.float32)[:, None, :]  # z: asym only
        u = tl.reshape(quantize_codes(y3, s32, z32, BITS, ASYM), (BT, DP))
        pack_store(codes_ptr, rows, rmask, tl.where(cmask[None, :], u, 0), RB, BT, DP, BITS)
        tl.store(flag_ptr + bh * tl.num_programs(1) + tl.program_id(1), flag)
    else:
        blk, j = tl.program_id(1), tl.program_id(2)
        soffs = (bh * NBLK + blk) * DP + cols
        amax = tl.load(stats_ptr + soffs)
        mn, mx = amax, amax
        if ASYM:
            mn = tl.load(stats_ptr + NSTAT + soffs)
            mx = tl.load(stats_ptr + 2 * NSTAT + soffs)
        s, z = _block_scale(amax, mn, mx, cmask, scale_ptr, zero_ptr, BITS, ASYM)
        flag = tl.full((), 0, tl.int32)
        if j == 0:  # one program per block stores its metadata
            flag = _store_scale(scale_ptr, zero_ptr, (bh * NBLK + blk) * D + cols, cmask, s, z,
                                ASYM)
        s32, z32 = s.to(tl.float32)[None, :], z.to(tl.float32)[None, :]  # z: unused when symmetric
        t, rmask = _block_tile(blk, j, T, TG, BT)
        rows = (bh * T + t).to(tl.int64)
        y, n = load_transformed(x_ptr, r_ptr, rows, rmask, D, BT, DP, BK, NSEP, HAS_ROT)
        u = quantize_codes(y, s32, z32, BITS, ASYM)
        pack_store(codes_ptr, rows, rmask, tl.where(cmask[None, :], u, 0), RB, BT, DP, BITS)
        tl.store(flag_ptr + (bh * NBLK + blk) * tl.num_programs(2) + j, flag)


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
    rmat = plan.rotation(D, dev) if plan.rot else x
    if plan.token_axis:
        kernel = _quantize_tokens_kernel
        tg = T if plan.gran == "pchan" else plan.group
        nblk = -(-T // tg)
        bt, g, single = token_tiles(T, tg, dp, is_interpreted(kernel))
        bk = tiles(1, dp, is_interpreted(kernel))[1]
        mshape = (B, H, nblk, D)
        grid = (B * H, triton.cdiv(T, bt)) if single else (B * H, nblk, triton.cdiv(tg, bt))
        nstat = B * H * nblk * dp
        args, extra = (T, D, rb, tg, nblk, nstat), dict(G=g, SINGLE=single)
    else:
        gs = dp if plan.gran == "ptok" else plan.group
        nm = 1 if plan.gran == "ptok" else D // gs
        kernel, mshape = _quantize_rows_kernel, (B, H, T, nm)
        bt, bk = tiles(B * H * T, dp, is_interpreted(kernel))
        grid = (triton.cdiv(B * H * T, bt),)
        args, extra = (B * H * T, D, rb, nm), dict(GS=gs, FMT=plan.fmt_code)
    meta["scale"] = torch.empty(mshape, dtype=plan.meta_dtype, device=dev)
    if plan.asym:
        meta["zero"] = torch.empty(mshape, dtype=plan.meta_dtype, device=dev)
    programs = math.prod(grid)
    flags = torch.zeros(2 * programs, dtype=torch.int32, device=dev)
    common = dict(BT=bt, DP=dp, BK=bk, NSEP=plan.nsep, HAS_ROT=plan.rot is not None,
                  ASYM=plan.asym, **launch_options(bt, dp))
    norm, zero = meta.get("norm", codes), meta.get("zero", codes)
    if plan.token_axis:
        stats = codes
        if not single:  # pass 1: absmax / min / max of every block, over all its tiles at once
            stats = torch.tensor([0.0, float("inf"), -float("inf")], device=dev)
            stats = stats.repeat_interleave(nstat)
            launch(_token_stats_kernel, grid, x, rmat, norm, stats, flags[programs:], T, D, tg,
                   nstat, **common)
        launch(kernel, grid, x, rmat, codes, norm, meta["scale"], zero, stats, flags, *args,
               BITS=plan.bits, **extra, **common)
    else:
        launch(kernel, grid, x, rmat, codes, norm, meta["scale"], zero, flags, *args,
               BITS=plan.bits, **extra, **common)
    nonfinite, overflow = torch.stack([(flags & 1).any(), (flags & 2).any()]).tolist()
    return codes, meta, int(nonfinite) | int(overflow) << 1
