"""Chunked reads of a layer's packed blocks for the fast decode attention.

A :class:`StreamReader` turns a chunk of quantized blocks of one stream (keys or values) into

    d      (batch, kv_heads, tokens, head_dim) fp32 in a reused scratch buffer, columns in the
           order ``perm`` (channel ``perm[j]`` is column j: int4/int2 codes unpack fastest as
           whole nibble planes, so the columns are not interleaved back),
    factor (batch, kv_heads, tokens) fp32 per-token factor (nsep), or None,

such that the dequantized K/V of those tokens are ``factor * d[..., inv(perm)] @ M`` with ``M``
the product of the inverse rotations (:meth:`StreamReader.matrix`). Attention then folds ``M``
into the query (keys) or the output (values) and ``factor`` into the scores (keys) or the value
weights (values), so the read costs one unpack, the quantizer's affine dequantize and, for nsep,
one norm over the chunk; K/V in fp32 exist only one chunk at a time.
"""

from __future__ import annotations

import math
from functools import cached_property

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
        nsep = self.factor_step
        self.renorm = nsep is not None and nsep.renorm

    @cached_property
    def factor_step(self):
        found = [t for t in self.pipeline.transforms if t.type == "nsep"]
        return found[0] if found else None

    @cached_property
    def rotations(self) -> list:
        return [t for t in self.pipeline.transforms if t.type == "rot"]

    def matrix(self, head_dim: int, device) -> torch.Tensor | None:
        """M (head_dim, head_dim) fp32 with x = factor * d @ M, or None (identity)."""
        m = None
        for rot in reversed(self.rotations):  # inverses run right to left: x @ R_n.T ... R_1.T
            r = rot.matrix(head_dim, device).T
            m = r if m is None else m @ r
        return m

    def chunk(self, seg, lo: int, hi: int, scratch: Scratch, name: str
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Blocks [lo, hi) of ``seg`` (a :class:`~kvq.hf.blocks.Segment`) ->
        (d (B, H, (hi-lo)*L, D) fp32, factor (B, H, tokens) or None, perm (D,) or None).

        ``d`` lives in ``scratch`` buffer ``name`` until the next read with that name.
        """
        q, h, blk = seg.q, seg.heads, seg.block
        b, d = q.codes.shape[0], q.shape[-1]
        nc = hi - lo
        shape = (b, h * nc, blk, d)
        out = scratch.get(name, shape, q.codes.device)
        codes = _blocks(q.codes, h, lo, hi)
        if self.identity:
            out.copy_(codes)
            return out.view(b, h, nc * blk, d), None, None
        meta = {k: _blocks(v, h, lo, hi) for k, v in q.meta.items()}
        planes = all(m.shape[-1] in (1, d) for m in meta.values())
        u8 = scratch.get(name, shape, q.codes.device, torch.uint8)
        perm = _unpack_into(codes, self.bits, d, u8, planes)
        out.copy_(u8)
        if perm is not None:  # per-channel metadata into column order (fp32: the fast kernel)
            meta = {k: (m if m.shape[-1] == 1 else m.float().index_select(-1, perm))
                    for k, m in meta.items()}
        x = _affine(out, meta, self.quantizer, self.granularity)
        x = x.reshape(b, h, nc * blk, d)
        return x, self._factor(x, meta, b, h), perm

    def _factor(self, x: torch.Tensor, meta: dict, b: int, h: int) -> torch.Tensor | None:
        if self.factor_step is None:
            return None
        f = meta["norm"].reshape(b, h, -1).float()
        if self.renorm:  # as NormSeparation.inverse: n / ||direction||
            # a zero length comes from an all-zero direction, whose scores and values are 0
            # whatever the (finite: norm <= 65504, / 1e-30) factor; NormSeparation divides by 1
            f = f / torch.linalg.vector_norm(x, dim=-1).clamp_min_(1e-30)
        return f


def _blocks(t: torch.Tensor, heads: int, lo: int, hi: int) -> torch.Tensor:
    """Folded (B, H*n, ...) -> blocks [lo, hi) of every head, folded (B, H*(hi-lo), ...)."""
    b, n = t.shape[0], t.shape[1] // heads
    if lo == 0 and hi == n:
        return t
    u = t.reshape(b, heads, n, *t.shape[2:])[:, :, lo:hi]
    return u.reshape(b, heads * (hi - lo), *t.shape[2:])


def _unpack_into(packed: torch.Tensor, bits: int, d: int, out: torch.Tensor,
                 planes: bool) -> torch.Tensor | None:
    """Unpack uint8 ``packed`` (..., ceil(d/8)*bits) into uint8 codes ``out`` (..., d).

    int4/int2 with ``planes`` (and d a multiple of 8) write bit planes side by side without
    interleaving them: column j holds channel ``perm[j]``, which is returned. Otherwise the
    columns are channels in order (returns None).
    """
    if bits == 8:
        out.copy_(packed[..., :d])
        return None
    if bits in (2, 4) and planes and d % 8 == 0:
        per, mask = 8 // bits, (1 << bits) - 1
        w = d // per
        for i in range(per):
            part = packed >> (bits * i) if i else packed
            out[..., i * w:(i + 1) * w] = part & mask if i < per - 1 else part  # top: no mask
        return _plane_perm(d, per, packed.device)
    out.copy_(unpack(packed, bits, d))
    return None


def _affine(x: torch.Tensor, meta: dict, quantizer, granularity) -> torch.Tensor:
    """The integer quantizer's dequantize on fp32 codes ``x``, as one fused pass in place:
    sym ``code * s - qmax * s``, asym ``code * s + zero`` (IntQuantizer.dequantize up to fp32
    rounding)."""
    g = granularity
    xg = g.view(x)
    s = g.from_meta(meta["scale"].float())
    bias = s * -quantizer.qmax if quantizer.scheme == "sym" else g.from_meta(meta["zero"].float())
    if xg.data_ptr() == x.data_ptr() and xg.is_contiguous():
        return g.unview(torch.addcmul(bias, xg, s, out=xg), x.shape)
    return g.unview(torch.addcmul(bias, xg, s), x.shape)  # a padded token-group view


_PERMS: dict = {}


def _plane_perm(d: int, per: int, device) -> torch.Tensor:
    """Channel of each column when ``per`` bit planes of d channels lie side by side."""
    key = (d, per, str(device))
    if key not in _PERMS:
        _PERMS[key] = torch.cat([torch.arange(i, d, per) for i in range(per)]).to(device)
    return _PERMS[key]


def inverse_perm(perm: torch.Tensor) -> torch.Tensor:
    """Column of each channel (cached for the plane permutations)."""
    key = ("inv", perm.data_ptr(), perm.numel(), str(perm.device))
    if key not in _PERMS:
        _PERMS[key] = torch.argsort(perm)
    return _PERMS[key]
