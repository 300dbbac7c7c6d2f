"""Uniform integer quantizer for 2, 3, 4 and 8 bits, symmetric or asymmetric (zero point)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator

from kvq import dtypes
from kvq.errors import SpecError
from kvq.quantizers.base import Quantizer


class IntQuantizer(Quantizer):
    """Rounded integer codes (ties to even; ``rounding=vllm``: up) with one scale (and zero) per
    granularity group.

    sym:  qmax = 2**(b-1) - 1, s = absmax / qmax, code = round(x / s).clamp(-qmax, qmax) + qmax
    asym: L = 2**b - 1, s = (max - min) / L, z = min, code = round((x - z) / s).clamp(0, L)

    Scales and zeros are stored at ``dtype`` and quantization uses the stored values, so
    dequantization (``(code - qmax) * s`` or ``code * s + z``) is consistent with them.

    ``rounding="vllm"`` (asym only) is vLLM 0.33's TurboQuant value store
    (``triton_turboquant_store.py::_store_quantized_value``): codes from the fp32 scale and min,
    ``code = trunc((x - min) / max(s, 1e-8) + 0.5).clamp(0, L)`` (ties round up), then s and min
    stored at ``dtype`` rounded to nearest, and decoded with the stored values.
    Metadata: ``scale`` (and ``zero``) in the granularity's layout.
    """

    type: Literal["int"] = "int"
    bits: Literal[2, 3, 4, 8]
    scheme: Literal["sym", "asym"] = "sym"
    dtype: dtypes.MetaDtype = "fp16"
    rounding: Literal["even", "vllm"] = "even"

    positional = ("bits", "scheme")

    @model_validator(mode="after")
    def _vllm_is_asym(self) -> IntQuantizer:
        if self.rounding == "vllm" and self.scheme != "asym":
            raise SpecError("int(rounding=vllm) is vLLM's asymmetric value quantizer",
                            suggestion=f"write int{self.bits}(asym,rounding=vllm)")
        return self

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
        # x is a temporary owned by the backend: scaled and rounded in place
        g = granularity
        xg, dim = g.view(x), g.reduce_dim
        lo, hi = xg.amin(dim=dim, keepdim=True), xg.amax(dim=dim, keepdim=True)
        if self.scheme == "sym":
            absmax = torch.maximum(hi, lo.neg_())
            scale = dtypes.store(g.to_meta(absmax / self.qmax), self.dtype, "scale",
                                 round_up=True)
            codes = xg.div_(_safe(g.from_meta(scale).float())).round_()
            codes = codes.clamp_(-self.qmax, self.qmax).add_(self.qmax)
            return g.unview(codes.to(torch.uint8), x.shape), {"scale": scale}
        if self.rounding == "vllm":
            s32 = (hi - lo) / self.levels
            codes = xg.sub_(lo).div_(s32.clamp_min(1e-8)).add_(0.5).trunc_()
            codes = codes.clamp_(0, self.levels)
            scale = dtypes.store(g.to_meta(s32), self.dtype, "scale")
            zero = dtypes.store(g.to_meta(lo), self.dtype, "zero point", check_precision=False)
            return g.unview(codes.to(torch.uint8), x.shape), {"scale": scale, "zero": zero}
        scale = dtypes.store(g.to_meta((hi - lo) / self.levels), self.dtype, "scale",
                             round_up=True)
        zero = dtypes.store(g.to_meta(lo), self.dtype, "zero point", check_precision=False)
        s, z = _safe(g.from_meta(scale).float()), g.from_meta(zero).float()
        codes = xg.sub_(z).div_(s).round_().clamp_(0, self.levels)
        return g.unview(codes.to(torch.uint8), x.shape), {"scale": scale, "zero": zero}

    def dequantize(self, codes, meta, granularity):
        g = granularity
        cg = g.view(codes).float()
        s = g.from_meta(meta["scale"].float())
        if self.scheme == "sym":
            out = cg.sub_(self.qmax).mul_(s)
        else:
            out = cg.mul_(s).add_(g.from_meta(meta["zero"].float()))
        return g.unview(out, codes.shape)

    def meta_bits(self, groups):
        per = dtypes.BITS[self.dtype] * (1 if self.scheme == "sym" else 2)
        return groups * per


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """Scale with zeros replaced by one (an all-zero group then gets the zero code)."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)
