"""Decode attention over packed K/V on torch (CPU or GPU): chunked, online softmax.

For one decode query per sequence, the visible tokens of a :class:`~kvq.hf.decode.DecodeView`
are read chunk by chunk (at most ``chunk_tokens`` tokens of keys and values in fp32 at a time,
in a reused scratch buffer), oldest first, then the exact residual window. Each chunk updates a
running max ``m``, sum ``l`` and output ``acc`` (flash-decoding's online softmax), so no K/V of the
whole layer is ever dequantized. Transforms are folded, never applied to K/V:

    scores_t = factor_k[t] * (q @ M_k.T)[perm_k] . d_k[t]        (rot: rotate the query once)
    out      = (sum_t p_t factor_v[t] d_v[t])[inv perm_v] @ M_v   (rot: rotate the output once)

with ``d`` the quantizer's affine dequantization of the codes (see :mod:`kvq.hf.packed`).
"""

from __future__ import annotations

import torch

from kvq.errors import KVQError
from kvq.hf.packed import inverse_perm

NEG = torch.finfo(torch.float32).min  # masked score: exp() gives 0 against any real score


class OnlineSoftmax:
    """Running softmax state for queries (B, H, G): max m, sum l, output acc (B, H, G, Dv)."""

    def __init__(self) -> None:
        self.m = self.l = self.acc = None

    def scores(self, s: torch.Tensor) -> torch.Tensor:
        """Take scores s (B, H, G, T); rescale the state; return p = exp(s - m) (B, H, G, T)."""
        if self.m is None:
            self.m = s.amax(dim=-1)
            p = torch.exp(s - self.m.unsqueeze(-1))
            self.l = p.sum(dim=-1)
            return p
        m = torch.maximum(self.m, s.amax(dim=-1))
        alpha = torch.exp(self.m - m)
        p = torch.exp(s - m.unsqueeze(-1))
        self.l = self.l * alpha + p.sum(dim=-1)
        self.acc.mul_(alpha.unsqueeze(-1))
        self.m = m
        return p

    def add(self, out: torch.Tensor) -> None:
        """Add p @ V (B, H, G, Dv) of the chunk whose p :meth:`scores` returned."""
        if self.acc is None:
            self.acc = out
        else:
            self.acc.add_(out)

    def result(self) -> torch.Tensor:
        return self.acc / self.l.unsqueeze(-1)


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
    layer = view.layer
    kwin, vwin = window
    h, dv = kwin.shape[1], vwin.shape[-1]
    g = hq // h
    q = query.float().reshape(b, h, g, d) * scaling
    bias = mask_bias(mask, b, h, g, view.visible)
    state = OnlineSoftmax()
    rk, rv = view.readers
    mk, mv = rk.matrix(d, query.device), rv.matrix(dv, query.device)
    qk = q if mk is None else q @ mk.T
    pos = 0  # absolute position of the next token read
    for seg_k, seg_v in zip(layer.k_store.segments, layer.v_store.segments):
        blk, n_live = seg_k.block, seg_k.length
        first = max(view.start - pos, 0) // blk  # whole blocks before the visible range
        step = max(1, view.chunk_tokens // blk)
        for lo in range(first, -(-n_live // blk), step):
            hi = min(lo + step, -(-n_live // blk))
            a, z = pos + lo * blk, pos + min(hi * blk, n_live)  # absolute token range
            skip = max(view.start - a, 0)
            dk, fk, perm_k = rk.chunk(seg_k, lo, hi, view.scratch, "k")
            qq = qk if perm_k is None else qk.index_select(-1, perm_k)
            s = torch.matmul(qq, dk[:, :, skip:z - a].transpose(-1, -2))
            if fk is not None:
                s.mul_(fk[:, :, None, skip:z - a])
            if bias is not None:
                s.add_(bias[..., a + skip - view.start:z - view.start])
            p = state.scores(s)
            dvv, fv, perm_v = rv.chunk(seg_v, lo, hi, view.scratch, "v")
            if fv is not None:
                p = p * fv[:, :, None, skip:z - a]
            out = torch.matmul(p, dvv[:, :, skip:z - a])  # (B, H, G, Dv) in the packed space
            if perm_v is not None:
                out = out.index_select(-1, inverse_perm(perm_v))
            state.add(out if mv is None else out @ mv)
        pos += n_live
    skip = max(view.start - pos, 0)
    kw, vw = kwin[:, :, skip:].float(), vwin[:, :, skip:].float()
    if kw.shape[2]:  # residual=0 can leave the window empty
        s = torch.matmul(q, kw.transpose(-1, -2))
        if bias is not None:
            s.add_(bias[..., pos + skip - view.start:])
        p = state.scores(s)
        state.add(torch.matmul(p, vw))
    return state.result().reshape(b, hq, 1, dv).to(query.dtype)
