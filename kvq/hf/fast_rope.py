"""Pre-RoPE keys on the fast decode path: rotate each dequantized key chunk for its positions.

A layer with ``rope: pre`` stores keys before the rotary embedding (docs/pre-rope-and-sinks.md);
the general path rotates the whole dequantized layer on every read. The fast path rotates one
chunk at a time, in the scratch buffer, with the model's own ``(cos, sin)`` for the visible
quantized tokens, computed once per decode forward and shared by the layers (they hold the same
positions). RoPE turns channel pairs ``(a, b)`` (``half``: ``i, i + r/2``; ``interleaved``:
``2i, 2i + 1``) by the same angle, so in place, with ``c``, ``s`` the pair's cos and sin::

    a' = a c - b s        b' = b c + a s

which is ``x cos + turn(x) sin``, the tracker's own map. When a rotation or klt basis ``M`` is
folded into the read (``x = factor * d @ M``), the chunk is first multiplied by ``M`` (a
``(tokens, D) @ (D, D)`` product per head): RoPE turns each token by its own angles, so ``M``
cannot be moved into the query; the factor still multiplies the scores.
"""

from __future__ import annotations

import torch


class RopeRead:
    """``(cos, sin)`` of held tokens ``[start, end)`` of one layer, fp32 ``(1 or B, 1, n, r)``,
    and the in-place rotation of key chunks among them. ``rope``: the layer's
    :class:`kvq.hf.rope.LayerRope`; ``offset``: tokens the layer dropped before its first held
    one (sliding windows), so held token ``t`` is cached token ``t + offset``."""

    def __init__(self, rope, start: int, end: int, like: torch.Tensor, offset: int = 0):
        cos, sin = rope.cos_sin(start + offset, end - start, like)
        r = cos.shape[-1]
        if rope.adapter.pairs == "half":
            self.a, self.b = slice(0, r // 2), slice(r // 2, r)
        else:
            self.a, self.b = slice(0, r, 2), slice(1, r, 2)
        self.start, self.cos, self.sin = start, cos, sin
        # the pair shares one angle in every family kvq knows; anything else: the full formula
        self.paired = (torch.equal(cos[..., self.a], cos[..., self.b])
                       and torch.equal(sin[..., self.a], sin[..., self.b]))
        self.c, self.s = cos[..., self.a], sin[..., self.a]
        self.turn = rope.adapter.pairs

    def rotate(self, keys: torch.Tensor, matrix: torch.Tensor | None, at: int, scratch
               ) -> torch.Tensor:
        """Pre-RoPE keys (B, H, n, D) fp32 of cached tokens [at, at + n) -> post-RoPE keys,
        ``keys @ matrix`` first when a matrix is folded. ``keys`` (a chunk in the scratch) is
        overwritten when there is no matrix; else the result is scratch buffer ``"rope"``."""
        x = keys
        if matrix is not None:
            x = head_matmul(keys, matrix, scratch.get("rope", keys.shape, keys.device))
        i, n = at - self.start, x.shape[-2]
        if not self.paired:
            from kvq.hf.rope import _turn

            cos, sin = self.cos[:, :, i:i + n], self.sin[:, :, i:i + n]
            r = cos.shape[-1]
            part = x[..., :r]
            part.copy_(part * cos + _turn(part, self.turn) * sin)
            return x
        c, s = self.c[:, :, i:i + n], self.s[:, :, i:i + n]
        a, b = x[..., self.a], x[..., self.b]
        tmp = scratch.get("rope_tmp", b.shape, x.device)
        torch.mul(b, s, out=tmp)
        b.mul_(c).addcmul_(a, s)
        a.mul_(c).sub_(tmp)
        return x


def head_matmul(x: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (B, H, n, D) = x (B, H, n, D) @ m ((D, D) or per head (H, D, D)), fp32.

    On CPU this runs through oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, one call
    per head with the matrix packed once): the tall, narrow product is about twice as fast there
    as through BLAS on the machines measured. Any other device, dtype, or a torch without that
    op uses ``torch.matmul``; both are fp32 products (they differ by rounding only)."""
    packed = _packed(m) if x.device.type == "cpu" and x.dtype == torch.float32 else None
    if packed is None:
        return torch.matmul(x, m, out=out)
    for h in range(x.shape[1]):
        w = packed[h if len(packed) > 1 else 0]
        out[:, h].copy_(torch.ops.mkldnn._linear_pointwise(x[:, h], w, None, "none", [], ""))
    return out


def _packed(m: torch.Tensor) -> list | None:
    """oneDNN-packed weights of ``m`` per head, kept on ``m`` itself (they go with it); None
    when oneDNN's linear is unavailable."""
    if not hasattr(m, "_kvq_packed"):
        try:
            mats = m if m.dim() == 3 else m[None]
            m._kvq_packed = [torch.ops.mkldnn._reorder_linear_weight(w.T.contiguous(), None)
                             for w in mats]
        except (AttributeError, RuntimeError):
            m._kvq_packed = None
    return m._kvq_packed
