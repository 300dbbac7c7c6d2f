"""Chunked reads of a layer's packed blocks for the fast decode attention.

A :class:`StreamReader` turns a chunk of quantized blocks of one stream (keys or values) into

    d      (batch, kv_heads, tokens, head_dim) fp32 in a reused scratch buffer: the decoded
           coordinates (the integer quantizer's affine map, or a level-table lookup for ``nuq``
           and ``alloc``), with sparse outliers scattered back;
    factor (batch, kv_heads, tokens) fp32 per-token factor (nsep), or None,

such that the dequantized K/V of those tokens are ``factor * d @ M`` with ``M`` the product of
the inverse rotations and klt bases (:meth:`StreamReader.matrix`, (D, D) or per head (H, D, D)).
A klt step's mean ``m`` is folded into ``d``: the inverse ``y @ U.T + m`` equals ``(y + U.T m) @
U.T`` for an orthonormal ``U``, so the shift ``U.T m`` (composed through the later matrices) is
added to the level tables (``alloc``, static ``nuq``) or to ``d`` once. Attention folds ``M``
into the query (keys) or the output (values) and ``factor`` into the scores (keys) or the value
weights (values), so a read costs the unpacking, one conversion and one affine or lookup pass;
K/V in fp32 exist only one chunk at a time. int4 (int2) codes are unpacked without float
temporaries by spreading each packed byte over a 16-bit (32-bit) lane and masking: one code per
byte, channels in order (:func:`unpack_into`). ``alloc``'s variable-width codes are read from
16-bit windows of the packed stream (:func:`alloc_codes`).

The nsep factor ``norm / ||direction||`` of a block never changes, so :meth:`StreamReader.factors`
computes it once when the block is written (the cache stores it, fp32, beside the block: see
docs/decode-attention.md); a chunk whose blocks have no stored factor takes the norm per read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvq.errors import KVQError
from kvq.quantizers.alloc import Alloc
from kvq.quantizers.nuq import Nuq
from kvq.quantizers.packing import unpack
from kvq.transforms import NormSeparation, Rotation
from kvq.transforms.klt import KLT
from kvq.transforms.sparse import Sparse


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


@dataclass
class Tables:
    """Per-head level tables of ``alloc`` or static ``nuq`` on one device, the klt shift added.

    flat: (H * D * L,) fp32, entry ``(h * D + c) * L + code``; base: (H, 1, D) int32, the
    offset ``(h * D + c) * L``. alloc only, each (H, 1, D): byte (int64) holding the channel's
    first bit in the packed stream, shift (int32) of that bit in the 16-bit window, mask (int32)
    ``2**width - 1``.
    """

    flat: torch.Tensor
    base: torch.Tensor
    byte: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def heads(self) -> int:
        return self.base.shape[0]


class StreamReader:
    """Fast reads of one stream's blocks with ``pipeline`` (covered by
    :func:`kvq.hf.coverage.fast_path_reason`)."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.identity = pipeline.is_identity
        self.bits = pipeline.bits
        self.quantizer, self.granularity = pipeline.quantizer, pipeline.granularity
        steps = pipeline.transforms
        self.sparse = steps[0] if steps and type(steps[0]) is Sparse else None
        found = [t for t in steps if type(t) is NormSeparation]
        self.factor_step = found[0] if found else None
        self.renorm = self.factor_step is not None and self.factor_step.renorm
        self.linear = [t for t in steps if type(t) in (Rotation, KLT)]  # forward order
        self.per_head = any(type(t) is KLT for t in self.linear)
        q = self.quantizer
        self.lookup = type(q) is Alloc or (type(q) is Nuq and q.scale == "static")
        self._folds: dict = {}
        self._tables: dict = {}

    def matrix(self, head_dim: int, device) -> torch.Tensor | None:
        """M with x = factor * d @ M: (head_dim, head_dim) fp32, per head (H, head_dim,
        head_dim) when a klt step is folded, or None (identity); cached."""
        return self._fold(head_dim, device)[0]

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
    def _fold(self, head_dim: int, device) -> tuple:
        """(M, shift) for ``head_dim``: the inverses of the rotations and klt steps, right to
        left, compose to ``x = d @ M + c``; ``shift = c @ M.T`` (H, D) moves c into d. Cached."""
        key = (head_dim, str(device))
        if key not in self._folds:
            m = c = None
            for t in reversed(self.linear):
                if type(t) is Rotation:
                    a, off = t.matrix(head_dim, device).T, None
                else:
                    a = t.tensor("klt.basis", device).transpose(1, 2)  # (H, D, D): U.T
                    off = t.tensor("klt.mean", device)  # (H, D)
                    if a.shape[-1] != head_dim:
                        raise KVQError(f"klt in {t.source!r} was fitted for head_dim "
                                       f"{a.shape[-1]}, the K/V have head_dim {head_dim}; use "
                                       "the file calibrated for this model")
                m = a if m is None else m @ a
                c = None if c is None else (c.unsqueeze(-2) @ a).squeeze(-2)
                c = off if c is None else (c if off is None else c + off)
            shift = None if c is None else (c.unsqueeze(-2) @ m.transpose(-1, -2)).squeeze(-2)
            self._folds[key] = (m, shift)
        return self._folds[key]

    def _dequantize(self, codes: torch.Tensor, meta: dict, dim: int, scratch: Scratch,
                    name: str) -> torch.Tensor:
        """Folded codes (B, Hn, L, bytes) -> d (B, Hn, L, dim) fp32 in ``scratch``."""
        b, hn, blk = codes.shape[:3]
        out = scratch.get(name, (b, hn, blk, dim), codes.device)
        if self.identity:
            return out.copy_(codes)
        shift = self._fold(dim, codes.device)[1]
        if self.lookup:
            d = self._lookup(codes, self._table(dim, codes.device), dim, out, scratch, name)
        else:
            unpacked = codes[..., :dim] if self.bits == 8 else unpack_into(
                codes, self.bits, dim, scratch, name)
            if type(self.quantizer) is Nuq:
                d = _minmax(out, unpacked, meta, self._levels(dim, codes.device),
                            self.granularity, scratch, name)
            else:
                d = _affine(out.copy_(unpacked), meta, self.quantizer, self.granularity)
            if shift is not None:
                _per_head(d, shift.shape[0]).add_(shift[:, None])
        if self.sparse is not None:
            d = _scatter(d, meta, self.sparse)
        return d

    def _lookup(self, codes: torch.Tensor, t: Tables, dim: int, out: torch.Tensor,
                scratch: Scratch, name: str) -> torch.Tensor:
        """Table lookup of folded codes (B, Hn, L, bytes) into ``out`` (B, Hn, L, dim) fp32."""
        if t.byte is not None:  # alloc
            idx = alloc_codes(_per_head(codes, t.heads), t, scratch, name)
        else:
            unpacked = codes[..., :dim] if self.bits == 8 else unpack_into(
                codes, self.bits, dim, scratch, name)
            unpacked = _per_head(unpacked, t.heads)
            idx = scratch.get(name + "_idx", unpacked.shape, codes.device, torch.int32)
            torch.add(unpacked, t.base, out=idx)
        torch.index_select(t.flat, 0, idx.reshape(-1), out=out.view(-1))
        return out

    def _levels(self, dim: int, device) -> torch.Tensor:
        """min-max ``nuq``'s levels (2**bits,) fp32 on ``device``; cached."""
        key = ("levels", dim, str(device))
        if key not in self._tables:
            self._tables[key] = self.quantizer.levels(dim, device)
        return self._tables[key]

    def _table(self, dim: int, device) -> Tables:
        """The :class:`Tables` of ``alloc`` / static ``nuq`` for ``dim`` on ``device``; cached."""
        key = (dim, str(device))
        if key in self._tables:
            return self._tables[key]
        q, shift = self.quantizer, self._fold(dim, device)[1]
        if type(q) is Alloc:
            widths = q.tensor("alloc.widths", device).long()  # (H, D)
            levels = q.tensor("alloc.levels", device)  # (H, D, L)
            if widths.shape[1] != dim:
                raise KVQError(f"alloc in {q.source!r} was fitted for head_dim {widths.shape[1]}"
                               f", the K/V have head_dim {dim}; use the file calibrated for this "
                               "model")
            first = widths.cumsum(1) - widths  # first bit of each channel in the stream
            # a width-0 channel at the end starts past the stream: any byte (its mask is 0)
            byte = (first // 8).clamp(max=-(-dim // 8) * q.bits - 1)
            extra = dict(byte=byte[:, None], shift=(first % 8).int()[:, None],
                         mask=((1 << widths) - 1).int()[:, None])
        else:
            zero, scale = q.static(device)  # (H, D)
            levels = q.levels(dim, device)[None, None] * scale[..., None] + zero[..., None]
            extra = {}
        if shift is not None:
            levels = levels + shift[..., None]
        h, d, n = levels.shape
        base = (torch.arange(h * d, device=device, dtype=torch.int32) * n).reshape(h, 1, d)
        self._tables[key] = Tables(levels.reshape(-1).contiguous(), base, **extra)
        return self._tables[key]

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


def alloc_codes(packed: torch.Tensor, t: Tables, scratch: Scratch, name: str) -> torch.Tensor:
    """uint8 alloc stream (B, H, T, bytes) -> int32 table indices (B, H, T, D): channel c of
    head h is ``(window >> shift) & mask`` of the 16-bit little-endian window at its first byte,
    plus the table offset of (h, c). Widths are at most 8 bits, so a code spans at most 2
    bytes."""
    b, h, n, nbytes = packed.shape
    words = scratch.get(name + "_words", (b, h, n, nbytes), packed.device, torch.int32)
    words.copy_(packed)
    if nbytes > 1:
        words[..., :-1].bitwise_or_(words[..., 1:] << 8)
    idx = scratch.get(name + "_idx", (b, h, n, t.base.shape[-1]), packed.device, torch.int32)
    torch.gather(words, -1, t.byte.expand(b, h, n, -1), out=idx)
    return idx.bitwise_right_shift_(t.shift).bitwise_and_(t.mask).add_(t.base)


def _per_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Folded (B, H*n, L, ...) -> (B, H, n*L, ...) (a view: blocks are folded head-major)."""
    return x.view(x.shape[0], heads, -1, *x.shape[3:])


def _scatter(d: torch.Tensor, meta: dict, sparse) -> torch.Tensor:
    """Put a sparse step's exact outliers into d (B, Hn, L, D), as Sparse.inverse does."""
    idx, vals = meta["outlier_index"].long(), meta["outlier_values"].float()
    if sparse.over == "token":
        return d.scatter_(-1, idx, vals)
    b, hn, blk, dim = d.shape
    d.view(b, hn, 1, blk * dim).scatter_(-1, idx, vals)
    return d


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


def _minmax(out: torch.Tensor, codes: torch.Tensor, meta: dict, levels: torch.Tensor,
            granularity, scratch: Scratch, name: str) -> torch.Tensor:
    """min-max ``nuq``'s dequantize of uint8 ``codes`` (B, Hn, L, D) into ``out`` fp32:
    ``levels[code] * scale + zero`` in the granularity's view."""
    g = granularity
    idx = scratch.get(name + "_idx", codes.shape, codes.device, torch.int32)
    idx.copy_(codes)
    torch.index_select(levels, 0, idx.view(-1), out=out.view(-1))
    xg = g.view(out)
    s, z = g.from_meta(meta["scale"].float()), g.from_meta(meta["zero"].float())
    if xg.data_ptr() == out.data_ptr() and xg.is_contiguous():
        return g.unview(xg.mul_(s).add_(z), out.shape)
    return g.unview(xg * s + z, out.shape)
