"""Chunked reads of a layer's packed blocks for the fast decode attention.

A :class:`StreamReader` turns a chunk of quantized blocks of one stream (keys or values) into

    d      (batch, kv_heads, tokens, head_dim) fp32 in a reused scratch buffer: the quantizer's
           affine dequantization of the codes, columns in *plane-major* order. int4 (int2)
           codes unpack fastest as whole bit planes (two (four) codes per byte, unpacked with
           64-bit word operations, then converted into the columns of their plane), so column
           i*D/P + k holds channel k*P + i (:func:`to_columns`; P = 1 for int8, none, int3 and
           per-channel-group scales, which are read in channel order);
    factor (batch, kv_heads, tokens) fp32 per-token factor (nsep), or None,

such that the dequantized K/V of those tokens are ``factor * from_columns(d) @ M`` with ``M``
the product of the inverse rotations (:meth:`StreamReader.matrix`). Attention puts the query
into the same column order and the output back (both tiny), folds ``M`` into the query (keys)
or the output (values) and ``factor`` into the scores (keys) or the value weights (values). So
a read costs the unpacking, one conversion and one fused affine pass; K/V in fp32 exist only one
chunk at a time.

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
              ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Blocks [lo, hi) of ``seg`` (a :class:`~kvq.hf.blocks.Segment`) ->
        (d (B, H, (hi-lo)*L, D) fp32, factor (B, H, tokens) or None, P): the columns of ``d``
        are P bit planes of D/P channels side by side (see :func:`to_columns`; P = 1: channels
        in order).

        ``d`` lives in ``scratch`` buffer ``name`` until the next read with that name.
        """
        q, h = seg.q, seg.heads
        meta = {k: _blocks(v, h, lo, hi) for k, v in q.meta.items()}
        d, per = self._dequantize(_blocks(q.codes, h, lo, hi), meta, q.shape[-1], scratch, name)
        stored = seg.extra.get("factor")
        f = self._factor(d, meta, None if stored is None else _blocks(stored, h, lo, hi))
        b = d.shape[0]
        d = d.reshape(b, h, -1, d.shape[-1])
        return d, None if f is None else f.reshape(b, h, -1), per

    def factors(self, q) -> dict[str, torch.Tensor]:
        """What to store beside new blocks ``q`` (folded (B, H*n, L, ...)): ``{"factor": (B,
        H*n, L) fp32}`` for nsep with renorm (the per-read norm then disappears), else {}."""
        if not self.renorm:
            return {}
        d, _ = self._dequantize(q.codes, q.meta, q.shape[-1], Scratch(), "factor")
        return {"factor": self._factor(d, q.meta, None)}

    # internals ----------------------------------------------------------------------------------
    def _dequantize(self, codes: torch.Tensor, meta: dict, dim: int, scratch: Scratch,
                    name: str) -> tuple[torch.Tensor, int]:
        """Folded codes (B, Hn, L, bytes) -> (d (B, Hn, L, dim) fp32 in ``scratch``, planes)."""
        b, hn, blk = codes.shape[:3]
        out = scratch.get(name, (b, hn, blk, dim), codes.device)
        if self.identity:
            return out.copy_(codes), 1
        per = _planes(self.bits, dim, meta, blk, self.granularity)
        if per == 1:  # int8: the codes are bytes
            out.copy_(codes[..., :dim])
        elif per:
            u8 = scratch.get(name, (per, b, hn, blk, dim // per), codes.device, torch.uint8)
            _unpack_planes(codes, self.bits, per, u8)
            out.view(b, hn, blk, per, dim // per).movedim(3, 0).copy_(u8)
        if per:
            _column_affine(out, meta, self.quantizer, per)
            return out, per
        u8 = scratch.get(name, (b, hn, blk, dim), codes.device, torch.uint8)
        out.copy_(u8.copy_(unpack(codes, self.bits, dim)))
        return _affine(out, meta, self.quantizer, self.granularity), 1

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


def _planes(bits: int, dim: int, meta: dict, blk: int, granularity) -> int:
    """Bit planes to read the codes as (8 // bits for int2/int4, 1 for int8), or 0 when the
    codes go through the general unpacking (int3, channel groups, a token-group tail)."""
    if bits not in (2, 4, 8) or dim % 8:
        return 0
    kind = granularity.type
    if kind == "group" and (granularity.axis != "token" or blk % granularity.size):
        return 0
    if kind not in ("ptok", "pchan", "group"):
        return 0
    for m in meta.values():
        per_token = m.shape[-1] == 1 and m.shape[-2] == blk
        per_channel = m.shape[-1] == dim and blk % m.shape[-2] == 0
        if not (per_token or per_channel):
            return 0
    return 8 // bits


_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16))


def _unpack_planes(packed: torch.Tensor, bits: int, per: int, out: torch.Tensor) -> None:
    """uint8 ``packed`` (B, Hn, L, bytes) -> codes ``out`` (per, B, Hn, L, bytes): plane i holds
    bits [i*bits, (i+1)*bits) of every byte, i.e. channels i, i+per... Byte-parallel on the
    widest integer word the row length allows (int2/int4)."""
    nbytes = packed.shape[-1]
    packed = packed.contiguous()
    dtype, width = torch.uint8, 1
    for width, dtype in _WORDS:
        if nbytes % width == 0 and packed.storage_offset() % width == 0:
            break
    else:
        width, dtype = 1, torch.uint8
    mask = int.from_bytes(bytes([(1 << bits) - 1]) * width, "little")  # < 2**(8w-1): signed ok
    words = packed.view(dtype)
    planes = out.view(dtype)
    for i in range(per):
        if i == 0:
            torch.bitwise_and(words, mask, out=planes[0])
        else:
            torch.bitwise_right_shift(words, bits * i, out=planes[i])
            planes[i].bitwise_and_(mask)


def to_columns(x: torch.Tensor, per: int) -> torch.Tensor:
    """Channels (..., D) -> plane-major columns (..., D): column i*D/per + k holds channel
    k*per + i (bit plane i of the packed codes). Contiguous: a strided operand would slow the
    affine pass several times."""
    if per == 1:
        return x
    x = x.reshape(*x.shape[:-1], x.shape[-1] // per, per).transpose(-1, -2)
    return x.reshape(*x.shape[:-2], -1)


def from_columns(x: torch.Tensor, per: int) -> torch.Tensor:
    """Inverse of :func:`to_columns`."""
    if per == 1:
        return x
    x = x.reshape(*x.shape[:-1], per, x.shape[-1] // per).transpose(-1, -2)
    return x.reshape(*x.shape[:-2], -1)


def _column_affine(d: torch.Tensor, meta: dict, quantizer, per: int) -> None:
    """The integer quantizer's dequantize in place on fp32 codes ``d`` (B, Hn, L, D) in
    plane-major columns: sym ``code * s - qmax * s``, asym ``code * s + zero``
    (IntQuantizer.dequantize up to fp32 rounding), scales per token (B, Hn, L, 1) or per
    channel over U token groups (B, Hn, U, D)."""
    s = meta["scale"]
    if s.shape[-1] == 1:
        view, sp = d, s.float()
        zp = None if quantizer.scheme == "sym" else meta["zero"].float()
    else:
        b, hn, blk, dim = d.shape
        u = s.shape[-2]
        view = d.view(b, hn, u, blk // u, dim)
        sp = to_columns(s.float(), per).unsqueeze(-2)
        zp = None if quantizer.scheme == "sym" else to_columns(
            meta["zero"].float(), per).unsqueeze(-2)
    bias = sp * -quantizer.qmax if zp is None else zp
    torch.addcmul(bias, view, sp, out=view)


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
