"""The Triton decode attention over a :class:`~kvq.hf.decode.DecodeView`: walks the layer's
quantized segments with the split-K kernel of :mod:`kvq.backends.triton.decode_attention`, attends
the exact window in torch and merges the partials. Same contract as
:func:`kvq.hf.flash_decode.decode_attention`.
"""

from __future__ import annotations

import torch

from kvq.backends.triton.decode_attention import reduce_partials, segment_partials
from kvq.backends.triton.plan import KernelPlan, Unsupported
from kvq.hf.flash_decode import decode_attention, mask_bias


def plans(view) -> tuple[KernelPlan, KernelPlan] | None:
    """The kernel plans of a :class:`~kvq.hf.decode.DecodeView`'s pipelines, or None (also
    for pre-RoPE keys and sinks, which only the torch path reads)."""
    if getattr(view.layer, "pre_rope", False) or getattr(view.layer, "sinks", 0):
        return None
    try:
        out = tuple(KernelPlan.from_pipeline(r.pipeline) for r in view.readers)
    except Unsupported:
        return None
    # kvq's integer codes only: block formats and codebooks have other kernels
    ok = all(p.fmt == "int" and p.codebook is None for p in out)
    return out if ok else None


def triton_decode_supported(view) -> bool:
    """True when both pipelines have integer kernel plans (int2/3/4/8; nsep, rot; ptok, pchan,
    group)."""
    return plans(view) is not None


def triton_decode_attention(query: torch.Tensor, view, window, mask, scaling: float,
                            per_split: int | None = None, bt: int | None = None
                            ) -> torch.Tensor:
    """Same contract as :func:`kvq.hf.flash_decode.decode_attention`, on the Triton kernel."""
    b, hq, _, d = query.shape
    kwin, vwin = window
    h, dv = kwin.shape[1], vwin.shape[-1]
    g = hq // h
    plan_k, plan_v = plans(view)
    rk, rv = view.readers
    mk, mv = rk.matrix(d, query.device), rv.matrix(dv, query.device)
    q = query.float().reshape(b, h, g, d) * scaling
    qk = q if mk is None else q @ mk.T
    bias = mask_bias(mask, b, h, g, view.visible)
    if bias is not None and (bias.shape[1] != 1 or bias.shape[2] != 1):
        return decode_attention(query, view, window, mask, scaling)
    flat_bias = None if bias is None else bias.reshape(b, view.visible)
    parts, pos = [], 0
    for seg_k, seg_v in zip(view.layer.k_store.segments, view.layer.v_store.segments):
        first = max(view.start - pos, 0)
        if first < seg_k.length:
            mq, lq, aq = segment_partials(qk.reshape(b * h, g, d), seg_k, seg_v, plan_k, plan_v,
                                          first, flat_bias, view.start - pos, per_split, bt)
            parts.append((mq, lq, aq if mv is None else aq @ mv))
        pos += seg_k.length
    skip = max(view.start - pos, 0)
    kw, vw = kwin[:, :, skip:].float(), vwin[:, :, skip:].float()
    if kw.shape[2]:
        s = torch.matmul(q, kw.transpose(-1, -2))
        if bias is not None:
            s = s + bias[..., pos + skip - view.start:]
        mw = s.amax(dim=-1)
        p = torch.exp(s - mw.unsqueeze(-1))
        parts.append((mw.unsqueeze(2), p.sum(dim=-1).unsqueeze(2),
                      torch.matmul(p, vw).unsqueeze(2)))
    return reduce_partials(parts).reshape(b, hq, 1, dv).to(query.dtype)
