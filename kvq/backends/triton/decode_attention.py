"""Split-K decode attention over packed K/V (flash-decoding), codes unpacked in registers.

One program = one (batch, kv_head) pair and one split of a segment's tokens. It walks its tokens
in tiles of BT: loads the packed key codes and their metadata, dequantizes them in registers
(``unpack_load`` + ``dequantize_codes``, the kernels' shared helpers), takes the nsep factor
``norm / ||direction||`` from the tile, scores the G query heads of that KV head against it, and
does the same for values with an online softmax. It writes a partial (max m, sum l, output acc)
per split; :func:`reduce_partials` merges the splits of every segment with the exact residual
window (attended in torch) as in FlashInfer / vLLM's ``triton_decode_attention`` reduce step.
Walking a cache layer's segments is :mod:`kvq.hf.triton_decode` (the core knows no cache).

Rotations are never applied to K/V: the launcher rotates the query once (keys) and the merged
output once (values); the softmax scale is folded into the query too. Token position ``t`` of a
segment folded as (B, H*n, L, ...) is row ``bh * n * L + t`` of its codes and metadata, so the
granularity index of :mod:`kvq.backends.triton.unpack_dequantize` applies unchanged with T = L.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvq.backends.triton.common import dequantize_codes, launch, padded_dim, row_bytes, unpack_load
from kvq.backends.triton.plan import KernelPlan

NEG = -3.0e38


@triton.jit
def _tile(codes_ptr, norm_ptr, scale_ptr, zero_ptr, rows, rmask, L, D, RB, NT, NC, TGS, CGS,
          DP: tl.constexpr, BITS: tl.constexpr, ASYM: tl.constexpr, OFF: tl.constexpr,
          NSEP: tl.constexpr, RENORM: tl.constexpr):
    """(BT, DP) fp32 dequantized rows (0 on padding) and their (BT,) per-token factor."""
    cols = tl.arange(0, DP)
    u = unpack_load(codes_ptr, rows, rmask, cols, D, RB, BITS)
    mask = rmask[:, None] & (cols < D)[None, :]
    mrow = (rows // L) * NT + (rows % L) // TGS
    moffs = mrow[:, None] * NC + (cols // CGS)[None, :]
    s = tl.load(scale_ptr + moffs, mask=mask, other=0.0).to(tl.float32)
    z = s
    if ASYM:
        z = tl.load(zero_ptr + moffs, mask=mask, other=0.0).to(tl.float32)
    x = tl.where(mask, dequantize_codes(u, s, z, OFF, ASYM), 0.0)
    f = tl.full(rows.shape, 1.0, tl.float32)
    if NSEP:
        f = tl.load(norm_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        if RENORM:
            n = tl.sqrt_rn(tl.sum(x * x, axis=1))
            f = tl.math.div_rn(f, tl.where(n > 0, n, 1.0))
    return x, f


@triton.jit
def _split_kernel(
    q_ptr, bias_ptr, m_ptr, l_ptr, acc_ptr,
    kc_ptr, kn_ptr, ks_ptr, kz_ptr, vc_ptr, vn_ptr, vs_ptr, vz_ptr,
    NB, L, LIVE, FIRST, PER_SPLIT, BIAS_OFF, BIAS_LEN, BIAS_B, HEADS, G, D, DV, RBK, RBV,
    KNT, KNC, KTGS, KCGS, VNT, VNC, VTGS, VCGS,
    BT: tl.constexpr, GP: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
    KBITS: tl.constexpr, KASYM: tl.constexpr, KOFF: tl.constexpr, KNSEP: tl.constexpr,
    KRENORM: tl.constexpr, VBITS: tl.constexpr, VASYM: tl.constexpr, VOFF: tl.constexpr,
    VNSEP: tl.constexpr, VRENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Partials for tokens [FIRST + split*PER_SPLIT, ...) of one (batch, kv_head) of a segment.

    q (B*HEADS, G, D) fp32, already rotated and scaled; bias (BIAS_B, BIAS_LEN) additive fp32 at
    column token - BIAS_OFF; outputs m, l (B*HEADS, S, GP) and acc (B*HEADS, S, GP, DVP).
    """
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    gi = tl.arange(0, GP)
    dk = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    q = tl.load(q_ptr + (bh * G + gi[:, None]) * D + dk[None, :],
                mask=(gi < G)[:, None] & (dk < D)[None, :], other=0.0)
    m = tl.full((GP,), NEG, tl.float32)
    lsum = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DVP), tl.float32)
    lo = FIRST + split * PER_SPLIT
    hi = tl.minimum(lo + PER_SPLIT, LIVE)
    b = bh // HEADS
    for t0 in range(lo, hi, BT):
        t = t0 + tl.arange(0, BT)
        tmask = t < hi
        rows = bh * NB * L + t
        k, fk = _tile(kc_ptr, kn_ptr, ks_ptr, kz_ptr, rows, tmask, L, D, RBK, KNT, KNC, KTGS,
                      KCGS, DP, KBITS, KASYM, KOFF, KNSEP, KRENORM)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * fk[None, :]  # (GP, BT)
        if HAS_BIAS:
            bb = tl.minimum(b, BIAS_B - 1)
            s += tl.load(bias_ptr + bb * BIAS_LEN + (t - BIAS_OFF), mask=tmask, other=0.0)[None, :]
        s = tl.where(tmask[None, :], s, NEG)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.where(tmask[None, :], tl.exp(s - m_new[:, None]), 0.0)
        lsum = lsum * alpha + tl.sum(p, axis=1)
        v, fv = _tile(vc_ptr, vn_ptr, vs_ptr, vz_ptr, rows, tmask, L, DV, RBV, VNT, VNC, VTGS,
                      VCGS, DVP, VBITS, VASYM, VOFF, VNSEP, VRENORM)
        acc = acc * alpha[:, None] + tl.dot(p * fv[None, :], v, input_precision="ieee")
        m = m_new
    out = bh * nsplit + split
    tl.store(m_ptr + out * GP + gi, m)
    tl.store(l_ptr + out * GP + gi, lsum)
    tl.store(acc_ptr + (out * GP + gi[:, None]) * DVP + dv[None, :], acc)


def _gran_index(plan: KernelPlan, L: int, d: int) -> tuple[int, int, int, int]:
    """(NT, NC, TGS, CGS) of unpack_dequantize's meta index for blocks of L tokens."""
    if plan.gran == "ptok":
        return L, 1, 1, padded_dim(d)
    if plan.gran == "group_channel":
        return L, d // plan.group, 1, plan.group
    if plan.gran == "pchan":
        return 1, d, L, 1
    return -(-L // plan.group), d, plan.group, 1


def segment_partials(q: torch.Tensor, seg_k, seg_v, plan_k: KernelPlan, plan_v: KernelPlan,
                     first: int, bias: torch.Tensor | None, bias_off: int,
                     per_split: int | None = None, bt: int | None = None):
    """Partials (m, l, acc) of one segment's tokens [first, live) for q (B*H, G, D) fp32.

    Returns m, l (B, H, S, G) and acc (B, H, S, G, Dv) fp32 (S splits). bias: (B or 1, visible)
    additive fp32 or None; column = segment token - bias_off.
    """
    ck, cv = seg_k.q, seg_v.q
    b, h = ck.codes.shape[0], seg_k.heads
    L, n, live = seg_k.block, ck.shape[1] // h, seg_k.length
    d, dv, g = ck.shape[-1], cv.shape[-1], q.shape[1]
    tokens = max(live - first, 0)
    if per_split is None:  # ~4 programs per SM-ish on big GPUs, at least 256 tokens each
        per_split = max(256, triton.next_power_of_2(-(-tokens * b * h // 1024)))
    bt = bt or (64 if d <= 128 else 32)
    splits = max(1, -(-tokens // per_split))
    gp, dp, dvp = max(16, triton.next_power_of_2(g)), padded_dim(d), padded_dim(dv)
    dev = q.device
    m = torch.empty(b * h, splits, gp, device=dev)
    lsum = torch.empty_like(m)
    acc = torch.empty(b * h, splits, gp, dvp, device=dev)

    def meta(qt, plan):
        s = qt.meta["scale"].contiguous()
        return (qt.codes.contiguous(), qt.meta["norm"].contiguous() if plan.nsep else s, s,
                qt.meta["zero"].contiguous() if plan.asym else s)

    has_bias = bias is not None
    bias_t = bias.contiguous() if has_bias else m
    launch(
        _split_kernel, (b * h, splits), q.contiguous(), bias_t, m, lsum, acc,
        *meta(ck, plan_k), *meta(cv, plan_v),
        n, L, live, first, per_split, bias_off, bias_t.shape[-1] if has_bias else 0,
        bias_t.shape[0] if has_bias else 1, h, g, d, dv, row_bytes(d, plan_k.bits),
        row_bytes(dv, plan_v.bits), *_gran_index(plan_k, L, d), *_gran_index(plan_v, L, dv),
        BT=bt, GP=gp, DP=dp, DVP=dvp,
        KBITS=plan_k.bits, KASYM=plan_k.asym, KOFF=plan_k.offset, KNSEP=plan_k.nsep != 0,
        KRENORM=plan_k.renorm, VBITS=plan_v.bits, VASYM=plan_v.asym, VOFF=plan_v.offset,
        VNSEP=plan_v.nsep != 0, VRENORM=plan_v.renorm,
        HAS_BIAS=has_bias, enable_fp_fusion=False,
    )
    shape = (b, h, splits)
    return (m[..., :g].reshape(*shape, g), lsum[..., :g].reshape(*shape, g),
            acc[:, :, :g, :dv].reshape(*shape, g, dv))


def reduce_partials(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                    ) -> torch.Tensor:
    """Merge partials [(m, l (B, H, S, G), acc (B, H, S, G, Dv))] -> output (B, H, G, Dv)."""
    m = torch.cat([p[0] for p in parts], dim=2)
    lsum = torch.cat([p[1] for p in parts], dim=2)
    acc = torch.cat([p[2] for p in parts], dim=2)
    top = m.amax(dim=2, keepdim=True)
    w = torch.exp(m - top)
    return (acc * w.unsqueeze(-1)).sum(dim=2) / (lsum * w).sum(dim=2).unsqueeze(-1)
