"""Chunked reads of a layer's packed blocks for the fast decode attention.

A :class:`StreamReader` turns a chunk of quantized blocks of one stream (keys or values) into

    d      (batch, kv_heads, tokens, head_dim) fp32 in a reused scratch buffer: the quantizer's
           affine dequantization of the codes (one fused pass on the granularity's view);
    factor (batch, kv_heads, tokens) fp32 per-token factor (nsep), or None,

such that the dequantized K/V of those tokens are ``factor * d @ M`` with ``M`` the product of
the inverse rotations (:meth:`StreamReader.matrix`). Attention folds ``M`` into the query (keys)
or the output (values) and ``factor`` into the scores (keys) or the value weights (values), so
a read costs the unpacking, one conversion and one affine pass; K/V in fp32 exist only one chunk
at a time. int4 (int2) codes are unpacked without float temporaries by spreading each packed
byte over a 16-bit (32-bit) lane and masking: one code per byte, channels in order
(:func:`unpack_into`).

The nsep factor ``norm / ||direction||`` of a block never changes, so :meth:`StreamReader.factors`
computes it once when the block is written (the cache stores it, fp32, beside the block: see
docs/decode-attention.md); a chunk whose blocks have no stored factor takes the norm per read.
"""

from __future__ import annotations

import math

import torch

from kvq.quantizers.packing import unpack


class Scratch:
    """Reusable flat buffers, one per (name, dtype), grown to the largest chunk asked for."""

    def __init__(self) -> None:
        self.bufs: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], device,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.bufs.get((name, dtype))
        if buf is None or buf.numel() < n or buf.device != torch.device(device):
            buf = self.bufs[(name, dtype)] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bufs.values())


class StreamReader:
    """Fast reads of one stream's blocks with ``pipeline`` (covered by
    :func:`kvq.hf.coverage.fast_path_reason`)."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.identity = pipeline.is_identity
        self.bits = pipeline.bits
        self.quantizer, self.granularity = pipeline.quantizer, pipeline.granularity
        found = [t for t in pipeline.transforms if t.type == "nsep"]
        self.factor_step = found[0] if found else None
        self.renorm = self.factor_step is not None and self.factor_step.renorm
        self.rotations = [t for t in pipeline.transforms if t.type == "rot"]
        self._matrices: dict = {}

    def matrix(self, head_dim: int, device) -> torch.Tensor | None:
        """M (head_dim, head_dim) fp32 with x = factor * d @ M, or None (identity); cached."""
        key = (head_dim, str(device))
        if key not in self._matrices:
            m = None
            for rot in reversed(self.rotations):  # inverses run right to left: x @ R_n.T ... R_1.T
                r = rot.matrix(head_dim, device).T
                m = r if m is None else m @ r
            self._matrices[key] = m
        return self._matrices[key]

    def chunk(self, seg, lo: int, hi: int, scratch: Scratch, name: str
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Blocks [lo, hi) of ``seg`` (a :class:`~kvq.hf.blocks.Segment`) ->
        (d (B, H, (hi-lo)*L, D) fp32, factor (B, H, tokens) or None).

        ``d`` lives in ``scratch`` buffer ``name`` until the next read with that name.
        """
        q, h = seg.q, seg.heads
        meta = {k: _blocks(v, h, lo, hi) for k, v in q.meta.items()}
        d = self._dequantize(_blocks(q.codes, h, lo, hi), meta, q.shape[-1], scratch, name)
        stored = seg.extra.get("factor")
        f = self._factor(d, meta, None if stored is None else _blocks(stored, h, lo, hi))
        b = d.shape[0]
        return d.reshape(b, h, -1, d.shape[-1]), None if f is None else f.reshape(b, h, -1)

    def factors(self, q) -> dict[str, torch.Tensor]:
        """What to store beside new blocks ``q`` (folded (B, H*n, L, ...)): ``{"factor": (B,
        H*n, L) fp32}`` for nsep with renorm (the per-read norm then disappears), else {}."""
        if not self.renorm:
            return {}
        d = self._dequantize(q.codes, q.meta, q.shape[-1], Scratch(), "factor")
        return {"factor": self._factor(d, q.meta, None)}

    # internals ----------------------------------------------------------------------------------
    def _dequantize(self, codes: torch.Tensor, meta: dict, dim: int, scratch: Scratch,
                    name: str) -> torch.Tensor:
        """Folded codes (B, Hn, L, bytes) -> d (B, Hn, L, dim) fp32 in ``scratch``."""
        b, hn, blk = codes.shape[:3]
        out = scratch.get(name, (b, hn, blk, dim), codes.device)
        if self.identity:
            return out.copy_(codes)
        if self.bits == 8:
            out.copy_(codes[..., :dim])
        else:
            out.copy_(unpack_into(codes, self.bits, dim, scratch, name))
        return _affine(out, meta, self.quantizer, self.granularity)

    def _factor(self, d: torch.Tensor, meta: dict, stored: torch.Tensor | None
                ) -> torch.Tensor | None:
        """Per-token factor (B, Hn, L) fp32: stored, or ``norm / ||d||`` as
        NormSeparation.inverse computes it (a zero length divides by one), or None."""
        if self.factor_step is None:
            return None
        if stored is not None:
            return stored
        f = meta["norm"].float().squeeze(-1)
        if not self.renorm:
            return f
        length = torch.linalg.vector_norm(d, dim=-1)
        return f / torch.where(length > 0, length, torch.ones_like(length))


def _blocks(t: torch.Tensor, heads: int, lo: int, hi: int) -> torch.Tensor:
    """Folded (B, H*n, ...) -> blocks [lo, hi) of every head, folded (B, H*(hi-lo), ...)."""
    b, n = t.shape[0], t.shape[1] // heads
    if lo == 0 and hi == n:
        return t
    u = t.reshape(b, heads, n, *t.shape[2:])[:, :, lo:hi]
    return u.reshape(b, heads * (hi - lo), *t.shape[2:])


#: codes per byte -> (lane dtype, left shift per code, byte mask over the lane)
_SPREAD = {2: (torch.int16, 4, 0x0F0F), 4: (torch.int32, 6, 0x03030303)}


def unpack_into(packed: torch.Tensor, bits: int, dim: int, scratch: Scratch, name: str
                ) -> torch.Tensor:
    """uint8 ``packed`` (..., ceil(dim/8)*bits) -> uint8 codes (..., dim), channels in order
    (as :func:`kvq.quantizers.packing.unpack`), in ``scratch``.

    int4/int2: each packed byte ``p`` goes into a 16-bit (32-bit) integer lane, ``p | p << 4``
    (``p | p << 6 | p << 12 | p << 18``) puts code j into byte j of the lane, a mask clears the
    rest; the lanes, read as bytes (little-endian), are the codes in order. Integer work only,
    no float temporaries. int3 uses the general unpacking.
    """
    per = 8 // bits
    if bits not in (2, 4):
        return unpack(packed, bits, dim)
    dtype, shift, mask = _SPREAD[per]
    lanes = scratch.get(name, packed.shape, packed.device, dtype)
    lanes.copy_(packed)
    if per == 2:
        tmp = scratch.get(name + "_tmp", packed.shape, packed.device, dtype)
        torch.bitwise_left_shift(lanes, shift, out=tmp).bitwise_or_(lanes)
    else:
        tmp = scratch.get(name + "_tmp", packed.shape, packed.device, dtype)
        torch.bitwise_left_shift(lanes, shift, out=tmp).bitwise_or_(lanes)  # p | p << 6
        torch.bitwise_left_shift(tmp, 2 * shift, out=lanes).bitwise_or_(tmp)  # | << 12, << 18
        tmp = lanes
    codes = tmp.bitwise_and_(mask).view(torch.uint8)
    return codes if codes.shape[-1] == dim else codes[..., :dim]


def _affine(x: torch.Tensor, meta: dict, quantizer, granularity) -> torch.Tensor:
    """The integer quantizer's dequantize on fp32 codes ``x`` (B, Hn, L, D) in channel order,
    in place where the granularity's view allows."""
    g = granularity
    xg = g.view(x)
    s = g.from_meta(meta["scale"].float())
    bias = s * -quantizer.qmax if quantizer.scheme == "sym" else g.from_meta(meta["zero"].float())
    if xg.data_ptr() == x.data_ptr() and xg.is_contiguous():
        return g.unview(torch.addcmul(bias, xg, s, out=xg), x.shape)
    return g.unview(torch.addcmul(bias, xg, s), x.shape)  # a padded token-group view
