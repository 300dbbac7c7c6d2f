"""Non-uniform scalar codebook quantizers: the base class of ``lloyd`` (and calibrated codebooks).

A subclass only says which levels to use (:meth:`CodebookQuantizer.codebook`); this base encodes,
decodes, scales and counts bits. The codebook is a function of the step's parameters and
head_dim, so it is never stored with the codes.
"""

from __future__ import annotations

from typing import Literal

import torch

from kvq import dtypes
from kvq.quantizers.base import Quantizer


class CodebookQuantizer(Quantizer):
    """Codes are indices into ``2**bits`` sorted fp32 levels; x -> nearest level.

    Encoding: ``code = #{midpoints m : v >= m}`` (``torch.bucketize(v, midpoints, right=True)``)
    with ``v = x / scale``, so a value exactly on a midpoint takes the *upper* level (as vLLM's
    TurboQuant store kernel, ``y >= mid``); values beyond the outer levels take them.
    Decoding: ``levels[code] * scale``.

    ``scale="absmax"``: one scale per granularity group, ``absmax / max|level|`` stored at
    ``dtype`` (the stored value is the one used), so the group's largest value maps onto the
    outermost level; an all-zero group gets scale 0 and decodes to zeros.
    ``scale="none"``: no scale and no metadata; the levels are used as they are (after ``nsep``
    and ``rot``, when the codebook is fitted to coordinates of unit vectors). Zero inputs then
    decode to the level nearest 0, not 0: put ``nsep`` before it (zero vectors keep norm 0).

    Metadata: ``scale`` in the granularity's layout (``absmax`` only). Codes: uint8, same shape
    as x, packed by :mod:`kvq.quantizers.packing` (2/3/4/8 bits).
    """

    bits: Literal[2, 3, 4, 8]
    scale: Literal["absmax", "none"] = "absmax"
    dtype: dtypes.MetaDtype = "fp16"

    def codebook(self, head_dim: int) -> torch.Tensor:
        """The ``2**bits`` levels for ``head_dim``-wide vectors: sorted fp32, shape (2**bits,)."""
        raise NotImplementedError

    def levels(self, head_dim: int, device=None) -> torch.Tensor:
        """:meth:`codebook` checked (shape, sorted, finite) and moved to ``device``."""
        lv = self.codebook(head_dim)
        n = 2**self.bits
        if lv.shape != (n,) or lv.dtype != torch.float32:
            raise ValueError(f"{type(self).__name__}.codebook({head_dim}) must be fp32 of shape "
                             f"({n},), got {lv.dtype} {tuple(lv.shape)}")
        if not (torch.isfinite(lv).all() and (lv[1:] > lv[:-1]).all()):
            raise ValueError(f"{type(self).__name__}.codebook({head_dim}) must be finite and "
                             "strictly increasing")
        return lv.to(device)

    def quantize(self, x, granularity):
        # x is a temporary owned by the backend: scaled in place
        g = granularity
        lv = self.levels(x.shape[-1], x.device)
        mids = (lv[1:] + lv[:-1]) / 2
        if self.scale == "none":
            return torch.bucketize(x, mids, right=True).to(torch.uint8), {}
        xg = g.view(x)
        absmax = xg.abs().amax(dim=g.reduce_dim, keepdim=True)
        top = lv.abs().max()
        scale = dtypes.store(g.to_meta(absmax / top), self.dtype, "scale")
        s = g.from_meta(scale).float()
        v = xg.div_(torch.where(s == 0, torch.ones_like(s), s))
        codes = torch.bucketize(v, mids, right=True).to(torch.uint8)
        return g.unview(codes, x.shape), {"scale": scale}

    def dequantize(self, codes, meta, granularity):
        lv = self.levels(codes.shape[-1], codes.device)
        out = lv[codes.long()]
        if self.scale == "none":
            return out
        g = granularity
        return g.unview(g.view(out).mul_(g.from_meta(meta["scale"].float())), codes.shape)

    def meta_bits(self, groups):
        return 0 if self.scale == "none" else groups * dtypes.BITS[self.dtype]
