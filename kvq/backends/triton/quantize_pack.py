"""Fused transform + quantize + bit-pack kernels and their host launcher.

- `_quantize_rows_kernel`: statistics within a row (ptok; group(g, channel)). One program = BT
  rows of x viewed as (B*H*T, D); one pass.
- `_quantize_tokens_kernel` with SINGLE: statistics over tokens (pchan; group(g, token)) when
  whole token blocks fit in a tile: one program quantizes BT // g blocks in one pass.
- Otherwise (pchan over a long sequence, big or non-power-of-two token groups) two passes over
  all tiles in parallel: `_token_stats_kernel` folds each tile's per-channel absmax/min/max
  into a float32 buffer with atomics (max/min are exact in any order), then
  `_quantize_tokens_kernel` recomputes the transforms of its tile and quantizes.
- phead scales and fp4(nv)'s tensor scale need each (batch, head)'s absmax first:
  `head_absmax` runs `_token_stats_kernel` over whole sequences, then the kernels above.
Programs write status bits: 1 = NaN/Inf in the (transformed) input, 2 = a stored
norm/scale/zero is not finite (e.g. it overflows float16), a llama.cpp block would dequantize
past float16's maximum, or a float-format scale is one the reference handles specially (see
`float_formats.format_scale`); the backend then lets the reference decide (its error, or its
result)."""

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
from kvq.backends.triton.float_formats import (
    NV_TENSOR,
    NV_TENSOR_INV,
    div_scalar,
    format_codes,
    format_scale,
)
from kvq.backends.triton.ggml_blocks import ggml_block_codes, ggml_fp16_overflow
from kvq.backends.triton.plan import KernelPlan


@triton.jit
def _flag(v, mask, BIT: tl.constexpr):
    """BIT (int32) when some value of v under the broadcast mask is NaN or Inf, else 0."""
    bad = (tl.abs(v.to(tl.float32)) == float("inf")) | (v != v)
    return tl.max(tl.ravel(tl.where(mask, bad, 0).to(tl.int32)), axis=0) * BIT


@triton.jit
def _any(cond, mask, BIT: tl.constexpr):
    """BIT (int32) when cond holds somewhere under the broadcast mask, else 0."""
    return tl.max(tl.ravel(tl.where(mask & cond, 1, 0)), axis=0) * BIT


@triton.jit
def _store_tensor_scale(tsc_ptr, bh, hmax, mask, FMT: tl.constexpr, RECIP: tl.constexpr):
    """fp4(nv): store the tensor scale head absmax / 2688 of heads bh under mask."""
    if FMT == 8:
        tl.store(tsc_ptr + bh, div_scalar(hmax, NV_TENSOR, NV_TENSOR_INV, RECIP), mask=mask)


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
    x_ptr, r_ptr, codes_ptr, norm_ptr, scale_ptr, zero_ptr, flag_ptr, hstat_ptr, tsc_ptr,
    mids_ptr, N, T, D, RB, NM, TOP, INV_TOP,
    BT: tl.constexpr, DP: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr,
    NSEP: tl.constexpr, HAS_ROT: tl.constexpr, BITS: tl.constexpr, ASYM: tl.constexpr,
    FMT: tl.constexpr = 0, SCALED: tl.constexpr = True, HEAD: tl.constexpr = False,
    RECIP: tl.constexpr = False,
):
    """x (N = B*H*T, D) -> codes (N, RB), scale/zero (N, NM), norm (N,); GS = group along
    channels.

    NM = D // GS meta columns (1 for ptok, where GS = DP covers the whole padded row).
    FMT: 0 kvq's int quantizer, 1-3 a llama.cpp block format (`ggml_blocks.py`), 4-8 a float
    format or scaled codebook (`float_formats.py`): TOP is fp8's / lloyd's top level, INV_TOP
    and RECIP see `float_formats.div_scalar`, mids_ptr holds lloyd's midpoints.
    HEAD (phead): one scale per (batch, head) of T rows from its absmax in hstat_ptr (B*H,),
    stored at meta row bh; fp4(nv) also reads hstat and stores tsc (B*H,).
    SCALED=False (fp8(none)): codes only, no metadata.
    """
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rmask = rows < N
    bh = rows // T
    y, n = load_transformed(x_ptr, r_ptr, rows, rmask, D, BT, DP, BK, NSEP, HAS_ROT)
    flag = _store_norm(norm_ptr, rows, rmask, n, NSEP) | _flag(y, rmask[:, None], 1)

    NG: tl.constexpr = DP // GS
    col3 = tl.arange(0, NG)[:, None] * GS + tl.arange(0, GS)[None, :]  # (NG, GS)
    valid3 = (col3 < D)[None, :, :]
    y3 = tl.reshape(y, (BT, NG, GS))
    gvalid = (tl.arange(0, NG) < NM)[None, :]  # all-padding groups: keep them finite
    if FMT >= 4 and not SCALED:  # fp8(none): the reference raises beyond the format's maximum
        u3 = format_codes(y3, y3, mids_ptr, FMT, BITS, False)
        flag = flag | _any((tl.abs(y3) > TOP) & (tl.abs(y3) < float("inf")),
                           rmask[:, None, None], 2)
    elif FMT >= 4:
        hmax = tl.zeros((BT,), tl.float32)
        if HEAD or FMT == 8:
            hmax = tl.load(hstat_ptr + bh, mask=rmask, other=0.0)
            _store_tensor_scale(tsc_ptr, bh, hmax, rmask & (rows % T == 0), FMT, RECIP)
        if HEAD:
            amax = tl.broadcast_to(hmax[:, None], (BT, NG))
        else:
            amax = tl.max(tl.abs(y3), axis=2)
        s_m, s32, bad = format_scale(amax, hmax[:, None], TOP, INV_TOP,
                                     scale_ptr.dtype.element_ty, FMT, RECIP)
        flag = flag | _any(bad, rmask[:, None] & gvalid, 2)
        u3 = format_codes(y3, s32[:, :, None], mids_ptr, FMT, BITS, True)
    elif FMT != 0:
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

    if SCALED:
        g = tl.arange(0, NG)
        mmask = rmask[:, None] & (g < NM)[None, :]
        if HEAD:  # the first row of each head stores its scale
            moffs = bh[:, None] + g[None, :]
            mmask = mmask & (rows % T == 0)[:, None]
        else:
            moffs = rows[:, None] * NM + g[None, :]
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
def _block_scale(amax, mn, mx, mask, hmax, TOP, INV_TOP, scale_ptr, zero_ptr,
                 BITS: tl.constexpr, ASYM: tl.constexpr, FMT: tl.constexpr, RECIP: tl.constexpr):
    """Scale (and zero) of token blocks from their statistics: (s, z) at the metadata dtypes,
    (s32, z32) the float32 values the codes use, and status bit 2 for a scale the reference
    must handle (`float_formats.format_scale`; hmax: the head's absmax for fp4(nv))."""
    if FMT >= 4:
        s, s32, bad = format_scale(amax, hmax, TOP, INV_TOP, scale_ptr.dtype.element_ty, FMT,
                                   RECIP)
        return s, s, s32, s32, _any(bad, mask, 2)
    elif ASYM:
        mn = tl.where(mask, mn, 0.0)  # padded channels: keep them finite
        mx = tl.where(mask, mx, 0.0)
        s = cast_rne(tl.math.div_rn(mx - mn, (1 << BITS) - 1.0), scale_ptr.dtype.element_ty)
        z = cast_rne(mn, zero_ptr.dtype.element_ty)
        return s, z, s.to(tl.float32), z.to(tl.float32), tl.full((), 0, tl.int32)
    else:
        s = cast_rne(tl.math.div_rn(amax, (1 << (BITS - 1)) - 1.0), scale_ptr.dtype.element_ty)
        return s, s, s.to(tl.float32), s.to(tl.float32), tl.full((), 0, tl.int32)


@triton.jit
def _codes(y, s32, z32, mids_ptr, BITS: tl.constexpr, ASYM: tl.constexpr, FMT: tl.constexpr):
    """Codes of y with float32 scale / zero: kvq's int quantizer or a scaled float format."""
    if FMT >= 4:
        return format_codes(y, s32, mids_ptr, FMT, BITS, True)
    else:
        return quantize_codes(y, s32, z32, BITS, ASYM)


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
    STORE_NORM: tl.constexpr = True,
):
    """Pass 1 of streamed token blocks: program (bh, blk, j) folds tile j of block blk into
    stats (3, NSTAT = B*H*NBLK*DP) float32 (absmax, min, max) with atomics, exact in any order.
    STORE_NORM=False: leave the nsep norms to the quantize kernel (`head_absmax`)."""
    bh, blk, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t, rmask = _block_tile(blk, j, T, TG, BT)
    rows = (bh * T + t).to(tl.int64)
    y, n = load_transformed(x_ptr, r_ptr, rows, rmask, D, BT, DP, BK, NSEP, HAS_ROT)
    flag = _flag(y, rmask[:, None], 1)
    if STORE_NORM:
        flag = flag | _store_norm(norm_ptr, rows, rmask, n, NSEP)
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
    x_ptr, r_ptr, codes_ptr, norm_ptr, scale_ptr, zero_ptr, stats_ptr, flag_ptr, hstat_ptr,
    tsc_ptr, mids_ptr, T, D, RB, TG, NBLK, NSTAT, TOP, INV_TOP,
    BT: tl.constexpr, DP: tl.constexpr, BK: tl.constexpr, G: tl.constexpr,
    NSEP: tl.constexpr, HAS_ROT: tl.constexpr, BITS: tl.constexpr, ASYM: tl.constexpr,
    SINGLE: tl.constexpr, FMT: tl.constexpr = 0, RECIP: tl.constexpr = False,
):
    """x (B*H, T, D) -> codes, per-channel scale/zero (B*H, NBLK, D) over TG-token blocks.

    SINGLE: program (bh, i) quantizes tokens [i*BT, (i+1)*BT) = BT // G whole blocks of G = TG
    tokens (pchan: one block, G = BT >= T) in one pass. Otherwise (pass 2 of streamed blocks)
    program (bh, blk, j) quantizes tile j of block blk with the statistics that
    `_token_stats_kernel` gathered; the j == 0 programs store the block's scale/zero.
    FMT, TOP, INV_TOP, RECIP, mids_ptr: as in `_quantize_rows_kernel`; fp4(nv) reads its
    head's absmax from hstat_ptr and the first program of the head stores tsc.
    """
    bh = tl.program_id(0)
    cols = tl.arange(0, DP)
    cmask = cols < D
    hmax = 0.0
    if FMT == 8:
        hmax = tl.load(hstat_ptr + bh)
        first = (tl.program_id(1) == 0) & (tl.program_id(2) == 0)
        _store_tensor_scale(tsc_ptr, bh, hmax, first, FMT, RECIP)
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
        s, z, s32, z32, bad = _block_scale(amax, mn, mx, mask, hmax, TOP, INV_TOP, scale_ptr,
                                           zero_ptr, BITS, ASYM, FMT, RECIP)
        flag = flag | bad | _store_scale(scale_ptr, zero_ptr, offs, mask, s, z, ASYM)
        u = tl.reshape(_codes(y3, s32[:, None, :], z32[:, None, :], mids_ptr, BITS, ASYM, FMT),
                       (BT, DP))
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
        s, z, s32, z32, bad = _block_scale(amax, mn, mx, cmask, hmax, TOP, INV_TOP, scale_ptr,
                                           zero_ptr, BITS, ASYM, FMT, RECIP)
        flag = tl.full((), 0, tl.int32)
        if j == 0:  # one program per block stores its metadata
            flag = bad | _store_scale(scale_ptr, zero_ptr, (bh * NBLK + blk) * D + cols, cmask,
                                      s, z, ASYM)
        t, rmask = _block_tile(blk, j, T, TG, BT)
        rows = (bh * T + t).to(tl.int64)
        y, n = load_transformed(x_ptr, r_ptr, rows, rmask, D, BT, DP, BK, NSEP, HAS_ROT)
        u = _codes(y, s32[None, :], z32[None, :], mids_ptr, BITS, ASYM, FMT)
        pack_store(codes_ptr, rows, rmask, tl.where(cmask[None, :], u, 0), RB, BT, DP, BITS)
        tl.store(flag_ptr + (bh * NBLK + blk) * tl.num_programs(2) + j, flag)


def head_absmax(plan: KernelPlan, x: torch.Tensor, rmat: torch.Tensor) -> torch.Tensor:
    """max |transformed x| of each (batch, head) of x (B, H, T, D): (B*H,) float32 (exact)."""
    B, H, T, D = x.shape
    dp = padded_dim(D)
    interpreted = is_interpreted(_token_stats_kernel)
    bt = token_tiles(T, T, dp, interpreted)[0]
    nstat = B * H * dp
    stats = torch.zeros(3 * nstat, dtype=torch.float32, device=x.device)  # absmax only (sym)
    grid = (B * H, 1, triton.cdiv(T, bt))
    flags = torch.zeros(math.prod(grid), dtype=torch.int32, device=x.device)
    # NSEP stores nothing here (the quantize kernel writes the norms): the norm pointer is unused
    launch(_token_stats_kernel, grid, x, rmat, stats, stats, flags, T, D, T, nstat, BT=bt, DP=dp,
           BK=tiles(1, dp, interpreted)[1], NSEP=plan.nsep, HAS_ROT=plan.rot is not None,
           ASYM=False, STORE_NORM=False, **launch_options(bt, dp))
    return stats[:nstat].view(B * H, dp)[:, :D].amax(dim=1)


def torch_divides_by_reciprocal(x: torch.Tensor) -> bool:
    """True when the torch reference for x divides by a Python float as a multiplication by its
    float32 reciprocal (CUDA does; CPU divides): the kernels then do the same."""
    return x.is_cuda


def _meta_shape(plan: KernelPlan, B: int, H: int, T: int, D: int) -> tuple[int, ...]:
    """Shape of the scale (and zero) metadata: the granularity's layout."""
    if plan.gran == "phead":
        return (B, H, 1, 1)
    if plan.gran == "pchan":
        return (B, H, 1, D)
    if plan.gran == "group_token":
        return (B, H, -(-T // plan.group), D)
    return (B, H, T, 1 if plan.gran == "ptok" else D // plan.group)


def quantize_pack(plan: KernelPlan, x: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Run the plan on x (B, H, T, D) -> (codes (B, H, T, RB) uint8, meta, status bits).

    meta holds "norm" (B, H, T, 1) for nsep, "scale" and, when asymmetric, "zero" in the
    granularity's layout (none for fp8(none)), and "tensor_scale" (B, H, 1, 1) for fp4(nv).
    Status (one host sync): 1 = NaN/Inf input, 2 = metadata the reference must decide on.
    """
    B, H, T, D = x.shape
    x = x.contiguous()
    dp, rb, dev = padded_dim(D), row_bytes(D, plan.bits), x.device
    codes = torch.empty((B, H, T, rb), dtype=torch.uint8, device=dev)
    meta: dict[str, torch.Tensor] = {}
    if plan.nsep:
        meta["norm"] = torch.empty((B, H, T, 1), dtype=plan.norm_dtype, device=dev)
    rmat = plan.rotation(D, dev) if plan.rot else x
    if plan.scaled:
        meta["scale"] = torch.empty(_meta_shape(plan, B, H, T, D), dtype=plan.meta_dtype,
                                    device=dev)
    if plan.asym:
        meta["zero"] = torch.empty_like(meta["scale"])
    if plan.fmt == "nv":
        meta["tensor_scale"] = torch.empty((B, H, 1, 1), dtype=torch.float32, device=dev)
    hstat = head_absmax(plan, x, rmat) if plan.head_stats else codes
    top, mids = plan.top, codes
    if plan.codebook is not None:
        levels = plan.levels(D, dev)
        mids, top = ((levels[1:] + levels[:-1]) / 2).contiguous(), levels.abs().max().item()
    ptrs = (hstat, meta.get("tensor_scale", codes), mids)  # hstat_ptr, tsc_ptr, mids_ptr
    inv = (torch.tensor(1.0) / torch.tensor(top)).item() if top else 0.0  # float32, rounded
    fmt = dict(TOP=top, INV_TOP=inv, FMT=plan.fmt_code, RECIP=torch_divides_by_reciprocal(x))
    if plan.token_axis:
        kernel = _quantize_tokens_kernel
        tg = T if plan.gran == "pchan" else plan.group
        nblk = -(-T // tg)
        bt, g, single = token_tiles(T, tg, dp, is_interpreted(kernel))
        bk = tiles(1, dp, is_interpreted(kernel))[1]
        grid = (B * H, triton.cdiv(T, bt)) if single else (B * H, nblk, triton.cdiv(tg, bt))
        nstat = B * H * nblk * dp
        args, extra = (T, D, rb, tg, nblk, nstat), dict(G=g, SINGLE=single)
    else:
        gs = plan.group if plan.gran == "group_channel" else dp  # ptok, phead: the whole row
        nm = D // gs if plan.gran == "group_channel" else 1
        kernel = _quantize_rows_kernel
        bt, bk = tiles(B * H * T, dp, is_interpreted(kernel))
        grid = (triton.cdiv(B * H * T, bt),)
        args = (B * H * T, T, D, rb, nm)
        extra = dict(GS=gs, SCALED=plan.scaled, HEAD=plan.gran == "phead")
    programs = math.prod(grid)
    flags = torch.zeros(2 * programs, dtype=torch.int32, device=dev)
    common = dict(BT=bt, DP=dp, BK=bk, NSEP=plan.nsep, HAS_ROT=plan.rot is not None,
                  ASYM=plan.asym, **launch_options(bt, dp))
    norm, scale = meta.get("norm", codes), meta.get("scale", codes)
    zero = meta.get("zero", codes)
    if plan.token_axis:
        stats = codes
        if not single:  # pass 1: absmax / min / max of every block, over all its tiles at once
            stats = torch.tensor([0.0, float("inf"), -float("inf")], device=dev)
            stats = stats.repeat_interleave(nstat)
            launch(_token_stats_kernel, grid, x, rmat, norm, stats, flags[programs:], T, D, tg,
                   nstat, **common)
        launch(kernel, grid, x, rmat, codes, norm, scale, zero, stats, flags, *ptrs, *args,
               BITS=plan.bits, **fmt, **extra, **common)
    else:
        launch(kernel, grid, x, rmat, codes, norm, scale, zero, flags, *ptrs, *args,
               BITS=plan.bits, **fmt, **extra, **common)
    nonfinite, overflow = torch.stack([(flags & 1).any(), (flags & 2).any()]).tolist()
    return codes, meta, int(nonfinite) | int(overflow) << 1
