"""Decode attention over packed K/V on torch (CPU or GPU): chunked, two passes.

For one decode query per sequence, the visible tokens of a :class:`~kvq.hf.decode.DecodeView`
are read chunk by chunk (at most ``chunk_tokens`` tokens of keys, then of values, in fp32 at a
time, in a reused scratch buffer), oldest first, then the exact residual window. One query's
scores are small ((B, heads, visible) fp32: ``G / head_dim`` of the fp16 K/V, 5% for SmolLM2),
so they are all kept: keys chunk by chunk -> scores -> one softmax -> values chunk by chunk. No
K/V of the whole layer is ever dequantized, and there is no online-softmax rescaling to pay per
chunk. Transforms are folded, never applied to K/V:

    scores_t = factor_k[t] * (q @ M_k.T) . d_k[t]           (rot: rotate the query once)
    out      = (sum_t p_t factor_v[t] d_v[t]) @ M_v          (rot: rotate the output once)

with ``d`` the quantizer's affine dequantization of the codes (see :mod:`kvq.hf.packed`).
"""

from __future__ import annotations

import torch

from kvq.errors import KVQError

NEG = torch.finfo(torch.float32).min  # masked score: exp() gives 0 against any real score


def mask_bias(mask: torch.Tensor | None, b: int, h: int, g: int, visible: int
              ) -> torch.Tensor | None:
    """An attention mask for one query, (B, 1 or H*G, 1, visible) bool (True = attend) or
    additive float -> additive fp32 bias (B, 1 or H, 1 or G, visible), or None."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[-2] != 1 or mask.shape[-1] != visible:
        raise KVQError(f"fast decode attention got a mask of shape {tuple(mask.shape)} for "
                       f"{visible} visible tokens and one query; expected (batch, 1 or heads, 1, "
                       f"{visible})")
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        bias.masked_fill_(~mask, NEG)
    else:
        bias = mask.float().clamp(min=NEG)
    if bias.shape[1] == 1:
        return bias.reshape(bias.shape[0], 1, 1, visible)
    return bias.reshape(bias.shape[0], h, g, visible)


def decode_attention(query: torch.Tensor, view, window: tuple[torch.Tensor, torch.Tensor],
                     mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """query (B, H*G, 1, D) -> output (B, H*G, 1, Dv) in the query's dtype.

    view: :class:`~kvq.hf.decode.DecodeView`; window: the exact residual (keys, values),
    (B, H, R, D) each; mask: see :func:`mask_bias`.
    """
    b, hq, _, d = query.shape
    kwin, vwin = window
    h, dv = kwin.shape[1], vwin.shape[-1]
    g = hq // h
    q = query.reshape(b, h, g, d).float() * scaling
    rk, rv = view.readers
    mk, mv = rk.matrix(d, query.device), rv.matrix(dv, query.device)
    rope = view.rope_read()  # pre-RoPE keys: rotate each chunk for its positions
    qk = q if mk is None or rope is not None else q @ mk.transpose(-1, -2)
    plan = view.plan()
    scores, at = [], view.start
    for seg_k, _, lo, hi, skip, n in plan:
        dk, fk = rk.chunk(seg_k, lo, hi, view.scratch, "kv")
        keys = _tokens(dk, skip, n, -2)
        if rope is not None:
            keys = rope.rotate(keys, mk, at, view.scratch)
        s = torch.matmul(qk, keys.transpose(-1, -2))  # (B, H, G, n)
        if fk is not None:
            s.mul_(_tokens(fk, skip, n, -1).unsqueeze(2))
        scores.append(s)
        at += n
    skip = max(view.start - view.quantized, 0)
    kw, vw = (kwin, vwin) if skip == 0 else (kwin[:, :, skip:], vwin[:, :, skip:])
    if kw.shape[2]:  # residual=0 can leave the window empty
        scores.append(torch.matmul(q, kw.float().transpose(-1, -2)))
    s = scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)  # (B, H, G, visible)
    sinks = view.sinks()
    if sinks is not None:
        sinks.set_scores(s, q)
    bias = mask_bias(mask, b, h, g, view.visible)
    if bias is not None:
        s.add_(bias)
    p = torch.softmax(s, dim=-1)
    sink_weights = None if sinks is None else sinks.take_weights(p)
    out, at = None, 0
    for _, seg_v, lo, hi, skip, n in plan:
        dvv, fv = rv.chunk(seg_v, lo, hi, view.scratch, "kv")
        w = p if len(scores) == 1 else p[..., at:at + n]
        if fv is not None:
            w = w * _tokens(fv, skip, n, -1).unsqueeze(2)
        o = torch.matmul(w, _tokens(dvv, skip, n, -2))  # (B, H, G, Dv)
        out = o if out is None else out.add_(o)
        at += n
    if out is not None and mv is not None:
        out = out @ mv
    if kw.shape[2]:
        o = torch.matmul(p[..., at:], vw.float())
        out = o if out is None else out.add_(o)
    if sink_weights is not None:
        sinks.add_values(out, sink_weights)
    return out.reshape(b, hq, 1, dv).to(query.dtype)


def _tokens(x: torch.Tensor, skip: int, n: int, dim: int) -> torch.Tensor:
    """Tokens [skip, skip + n) of ``x`` along ``dim`` (no slicing op when that is all)."""
    return x if skip == 0 and x.shape[dim] == n else x.narrow(dim, skip, n)
