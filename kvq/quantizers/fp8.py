"""FP8 quantizer: E4M3 / E5M2 codes with a scale per granularity group (or none).

The formats of vLLM's, SGLang's and TensorRT-LLM's FP8 KV caches (OCP 8-bit floating point,
torch ``float8_e4m3fn`` / ``float8_e5m2``). Codes are the 8-bit patterns of torch's own casts.
"""

from __future__ import annotations

from typing import Literal

import torch

from kvq import dtypes
from kvq.errors import NumericsError
from kvq.quantizers.base import Quantizer
from kvq.quantizers.scales import scale_groups, unscale_groups
from kvq.quantizers.static import StaticScaled

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


class FP8Quantizer(StaticScaled, Quantizer):
    """codes = bits of ``(x / s).clamp(-fmax, fmax).to(float8)``; decode ``float(code) * s``.

    ``scale="absmax"``: s = absmax / fmax per granularity group (fmax 448 for e4m3, 57344 for
    e5m2), stored at ``dtype`` (fp32 by default, as serving engines keep it) rounded toward zero,
    so the clamp (the OCP saturating conversion) acts only within that one rounding.
    ``scale="none"``: s = 1, a plain cast (vLLM's uncalibrated default scale 1.0); values beyond
    fmax raise :class:`NumericsError`, or with ``overflow="saturate"`` take +-fmax, as vLLM's
    TurboQuant k8v4 store does (its Triton cast ``k.to(tl.float8e4nv)`` lowers to PTX
    ``cvt.rn.satfinite``: round to nearest even, saturating). Rounding is torch's (nearest
    even), subnormals included. ``scale="static"``: s calibrated offline, per tensor or per KV
    head, read from ``source=FILE#NAME`` (vLLM's checkpoint ``k_scale`` / ``v_scale``;
    :mod:`kvq.quantizers.static`), saturating like vLLM's cast (``__NV_SATFINITE``); nothing
    stored per block, the granularity is unused. Metadata: ``scale`` in the granularity's
    layout (absmax only).
    """

    type: Literal["fp8"] = "fp8"
    format: Literal["e4m3", "e5m2"] = "e4m3"
    scale: Literal["absmax", "none", "static"] = "absmax"
    dtype: dtypes.MetaDtype = "fp32"
    source: str | None = None
    sha256: str | None = None
    overflow: Literal["raise", "saturate"] = "raise"

    positional = ("format", "scale")

    @property
    def bits(self) -> int:
        return 8

    @property
    def torch_dtype(self) -> torch.dtype:
        return FORMATS[self.format]

    @property
    def fmax(self) -> float:
        return torch.finfo(self.torch_dtype).max

    def quantize(self, x, granularity):
        # x is a temporary owned by the backend: scaled in place
        fmax = self.fmax
        if self.scale == "none" and self.overflow == "saturate":
            return x.clamp(-fmax, fmax).to(self.torch_dtype).view(torch.uint8), {}
        if self.scale == "none":
            big = (x.abs() > fmax) & torch.isfinite(x)
            if big.any():
                top = x[big].abs().max().item()
                raise NumericsError(f"|x| = {top:.4g} exceeds the {self.format} maximum "
                                    f"{fmax:g}; use a scaled fp8 ('fp8({self.format})')")
            return x.to(self.torch_dtype).view(torch.uint8), {}
        if self.scale == "static":
            v = x.div_(self.broadcast_scale(x.shape, x.device)).clamp_(-fmax, fmax)
            return v.to(self.torch_dtype).view(torch.uint8), {}
        g = granularity
        v, scale = scale_groups(x, g, fmax, self.dtype, "fp8 scale")
        codes = v.clamp_(-fmax, fmax).to(self.torch_dtype).view(torch.uint8)
        return g.unview(codes, x.shape), {"scale": scale}

    def dequantize(self, codes, meta, granularity):
        out = codes.contiguous().view(self.torch_dtype).float()
        if self.scale == "static":
            return out.mul_(self.broadcast_scale(codes.shape, codes.device))
        return out if self.scale == "none" else unscale_groups(out, meta["scale"], granularity)

    def meta_bits(self, groups):
        return 0 if self.scale in ("none", "static") else groups * dtypes.BITS[self.dtype]
