"""Uniform integer quantizer for 2, 3, 4 and 8 bits, symmetric or asymmetric (zero point)."""

from __future__ import annotations

from typing import Literal

import torch

from kvq import dtypes
from kvq.quantizers.base import Quantizer


class IntQuantizer(Quantizer):
    """Round-to-nearest-even integer codes with one scale (and zero) per granularity group.

    sym:  qmax = 2**(b-1) - 1, s = absmax / qmax, code = round(x / s).clamp(-qmax, qmax) + qmax
    asym: L = 2**b - 1, s = (max - min) / L, z = min, code = round((x - z) / s).clamp(0, L)

    Scales and zeros are stored at ``dtype`` and quantization uses the stored values, so
    dequantization (``(code - qmax) * s`` or ``code * s + z``) is consistent with them.
    Metadata: ``scale`` (and ``zero``) in the granularity's layout.
    """

    type: Literal["int"] = "int"
    bits: Literal[2, 3, 4, 8]
    scheme: Literal["sym", "asym"] = "sym"
    dtype: dtypes.MetaDtype = "fp16"

    positional = ("bits", "scheme")

    def spec_name(self):
        return f"int{self.bits}"

    def spec_fixed(self):
        return {"bits": self.bits}

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def quantize(self, x, granularity):
        if self.scheme == "sym":
            scale = dtypes.store(granularity.reduce(x, "absmax") / self.qmax, self.dtype, "scale")
            s = _safe(granularity.expand(scale.float(), x.shape))
            codes = torch.round(x / s).clamp_(-self.qmax, self.qmax).add_(self.qmax)
            return codes.to(torch.uint8), {"scale": scale}
        lo, hi = granularity.reduce(x, "min"), granularity.reduce(x, "max")
        scale = dtypes.store((hi - lo) / self.levels, self.dtype, "scale")
        zero = dtypes.store(lo, self.dtype, "zero point")
        s = _safe(granularity.expand(scale.float(), x.shape))
        z = granularity.expand(zero.float(), x.shape)
        codes = torch.round((x - z) / s).clamp_(0, self.levels)
        return codes.to(torch.uint8), {"scale": scale, "zero": zero}

    def dequantize(self, codes, meta, granularity):
        shape = codes.shape
        s = granularity.expand(meta["scale"].float(), shape)
        if self.scheme == "sym":
            return (codes.float() - self.qmax) * s
        return codes.float() * s + granularity.expand(meta["zero"].float(), shape)

    def meta_bits(self, groups):
        per = dtypes.BITS[self.dtype] * (1 if self.scheme == "sym" else 2)
        return groups * per


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """Scale with zeros replaced by one (an all-zero group then gets the zero code)."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)
