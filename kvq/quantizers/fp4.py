"""FP4 (E2M1) quantizer with MX or NVFP4 block scaling.

E2M1 values: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; a code is the 4-bit pattern
``sign << 3 | exponent << 1 | mantissa`` (so the magnitude's index in that list). Conversion
rounds to nearest, ties to even (even mantissa), and saturates at 6.

- ``mx`` (OCP Microscaling Formats spec v1.0, MXFP4 = ``group(32)>fp4(mx)``): per group,
  shared exponent ``e = floor(log2(amax)) - 2`` (2 = emax of E2M1), clamped to [-127, 127],
  stored as E8M0 (``e + 127``, 8 bits); elements are ``x / 2**e`` converted to E2M1.
- ``nv`` (NVIDIA NVFP4, as NVIDIA's TensorRT Model Optimizer 0.47 ``NVFP4QTensor`` computes it;
  ``group(16)>fp4(nv)``): an fp32 second-level scale ``t = amax / (6 * 448)`` and per group an
  E4M3 scale ``b = e4m3(clamp(group_amax / (6 * t), 2**-9, 448))`` (all-zero groups: 1 before
  the clamp; ``_cast_per_block_scale_to_fp8``); elements are ``x / (b * t)`` converted to E2M1
  with ModelOpt's sign rule (``x < 0``: -0.0 gets code 0, a tiny negative value code 8).
  kvq follows ModelOpt's ``amax / (6 t)``, not torchao's ``(amax / 6) / t`` (the two differ by
  one rounding and so at E4M3 ties): ModelOpt writes the NVFP4 checkpoints and KV-cache configs
  (``kv_cache_quant_algo``) that TensorRT-LLM and vLLM load. kvq computes ``t`` per (batch, head)
  of the quantized tensor (in a KVQCache, per head and cache block) rather than over a whole
  tensor, so that sequences of a batch never share a statistic; an all-zero (batch, head) slice
  decodes to zeros (ModelOpt divides 0 by 0 there). With ``scale=static`` (``fp4(nv,scale=static,
  source=FILE#NAME)``), ``t`` is calibrated offline per tensor or KV head, as ModelOpt's
  NVFP4 KV cache and TensorRT-LLM / vLLM run it (``kvq calibrate --recipe nvfp4``: ``t =
  amax / (6 * 448)`` over the calibration text); the E4M3 block scales stay dynamic.

MXFP4 keeps torchao's sign rule (the sign bit: -0.0 gets code 8), which kvq matches bit for bit.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import model_validator

from kvq.errors import SpecError
from kvq.quantizers.base import Quantizer
from kvq.quantizers.static import StaticScaled

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX, E4M3_MAX, EMAX_ELEM = 6.0, 448.0, 2


def e2m1_values(device=None) -> torch.Tensor:
    """The 16 code values, code = index: (16,) fp32 (code 8 is -0.0)."""
    v = torch.tensor(E2M1, device=device)
    return torch.cat([v, -v])


def to_e2m1(v: torch.Tensor, sign_of_zero: bool = True) -> torch.Tensor:
    """fp32 -> E2M1 codes (uint8, same shape): round to nearest even, saturate at +-6; the sign
    bit is v's sign bit (``sign_of_zero``: -0.0 -> 8, torchao) or ``v < 0`` (-0.0 -> 0,
    ModelOpt)."""
    a = v.abs()
    mids = torch.tensor([(lo + hi) / 2 for lo, hi in zip(E2M1, E2M1[1:])], device=v.device)
    idx = torch.bucketize(a, mids)  # a == mids[i] -> i, the lower level
    tie = a == mids[idx.clamp(max=len(mids) - 1)]
    idx = idx + (tie & (idx % 2 == 1)).long()  # ties go to the even mantissa
    neg = torch.signbit(v) if sign_of_zero else v < 0
    return (idx | (neg.long() << 3)).to(torch.uint8)


class FP4Quantizer(StaticScaled, Quantizer):
    """E2M1 codes with ``mx`` (E8M0 power-of-two) or ``nv`` (E4M3 + fp32) scales per group.

    Metadata: ``scale`` uint8 in the granularity's layout (E8M0 exponent codes for mx, E4M3
    bit patterns for nv); nv adds ``tensor_scale`` fp32 (batch, kv_heads, 1, 1).
    """

    type: Literal["fp4"] = "fp4"
    block: Literal["mx", "nv"]
    scale: Literal["dynamic", "static"] = "dynamic"  # nv: the fp32 second-level scale t
    source: str | None = None
    sha256: str | None = None
    calibrated_by: ClassVar[str] = "kvq calibrate --recipe nvfp4"

    positional = ("block",)

    @property
    def bits(self) -> int:
        return 4

    def quantize(self, x, granularity):
        g = granularity
        xg = g.view(x)
        amax = xg.abs().amax(dim=g.reduce_dim, keepdim=True)
        if self.block == "mx":
            e = torch.frexp(amax).exponent - 1 - EMAX_ELEM  # floor(log2(amax)) - emax
            e = torch.where(amax > 0, e, -127).clamp_(-127, 127)
            v = xg.div_(torch.exp2(e.float()))
            return g.unview(to_e2m1(v), x.shape), {"scale": g.to_meta((e + 127).to(torch.uint8))}
        if self.scale == "static":
            t = self.broadcast_scale(x.shape, x.device).expand(x.shape[0], x.shape[1], 1, 1)
        else:
            t = x.abs().amax(dim=(-2, -1), keepdim=True) / (E2M1_MAX * E4M3_MAX)  # (B, H, 1, 1)
        b = g.to_meta(amax) / (E2M1_MAX * torch.where(t == 0, torch.ones_like(t), t))
        b = torch.where(b == 0, torch.ones_like(b), b)
        b = b.clamp(min=2**-9, max=E4M3_MAX).to(torch.float8_e4m3fn)
        step = g.from_meta(b.float() * t)
        v = xg.div_(torch.where(step == 0, torch.ones_like(step), step))
        return (g.unview(to_e2m1(v, sign_of_zero=False), x.shape),
                {"scale": b.view(torch.uint8), "tensor_scale": t})

    def dequantize(self, codes, meta, granularity):
        g = granularity
        out = g.view(e2m1_values(codes.device)[codes.long()])
        if self.block == "mx":
            scale = torch.exp2(meta["scale"].float() - 127)
        else:
            scale = meta["scale"].view(torch.float8_e4m3fn).float() * meta["tensor_scale"]
        return g.unview(out.mul_(g.from_meta(scale)), codes.shape)

    @model_validator(mode="after")
    def _static_nv(self):
        if self.scale == "static" and self.block != "nv":
            raise SpecError("fp4(mx) has no second-level scale to calibrate; scale=static is "
                            "for fp4(nv)", suggestion="write fp4(nv,scale=static,source=...)")
        return self

    def meta_bits(self, groups):  # static t lives in the checkpoint, not in each block
        return groups * 8 + (32 if self.block == "nv" and self.scale == "dynamic" else 0)
