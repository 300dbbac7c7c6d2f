"""llama.cpp's KV cache block formats ``q4_0``, ``q4_1``, ``q8_0`` (``-ctk/-ctv``), bit-exact.

Each block is 32 consecutive channels of one token (``group(32)``, implied by the name) with an
fp16 scale ``d`` (and, for q4_1, an fp16 minimum ``m``). The codes are computed exactly as
ggml's reference (``gguf.quants``, ``ggml-quants.c``) computes them: in float32 with the
*unrounded* scale, by multiplying with its reciprocal, so they match ggml bit for bit; only the
scale is then rounded to fp16 and dequantization uses the stored value.

- q4_0: ``d = x[argmax |x|] / -8``, code ``trunc(x / d + 8.5)`` in [0, 15], value ``(code - 8) d``:
  the value of largest magnitude maps to -8 exactly, so all 16 levels are used. 4.5 bits.
- q4_1: ``d = (max - min) / 15``, code ``trunc((x - min) / d + 0.5)`` in [0, 15],
  value ``code d + m``. 5 bits.
- q8_0: ``d = max |x| / 127``, code ``round_half_away(x / d)`` in [-127, 127], value ``code d``.
  8.5 bits.

kvq stores the signed codes offset by ``2**(bits-1)`` as unsigned (q4_0's code is ggml's nibble;
q8_0's is its int8 + 128), bit-packed in kvq's layout. Metadata ``scale`` (and ``zero`` = m):
(batch, kv_heads, seq, head_dim // 32) fp16. head_dim must be a multiple of 32.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from kvq.errors import KVQError, NumericsError, SpecError
from kvq.granularity import Granularity, Group
from kvq.quantizers.base import Quantizer

BLOCK = 32
FP16_MAX = 65504.0


class GGMLQuantizer(Quantizer):
    """A ggml block format: blocks of 32 channels, fp16 scale; subclasses define the rounding."""

    bits: ClassVar[int]
    #: value = (code - offset) * d (+ m)
    offset: ClassVar[int]
    #: fp16 values stored per block (d, and m for q4_1)
    stored: ClassVar[int] = 1

    def resolve_granularity(self, given: Granularity | None) -> Granularity:
        if given is not None and given != Group(size=BLOCK):
            raise SpecError(f"{self.spec_name()!r} quantizes blocks of {BLOCK} channels and cannot "
                            f"use the granularity {given.to_spec()!r}",
                            suggestion=f"drop it: '{self.spec_name()}' implies 'group({BLOCK})'")
        return Blocks(size=BLOCK)

    def quantize(self, x, granularity):
        xg = granularity.view(x)  # (B, H, T, D // 32, 32)
        fits = xg.abs().amax(dim=-1, keepdim=True) <= FP16_MAX  # blocks float16 can hold
        d, extra = self.block_scale(xg)
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        codes = self.round(xg.mul_(inv), extra)
        name = self.spec_name()
        stored = {"scale": _fp16(d, "scale", name),
                  **{k: _fp16(v, "minimum", name) for k, v in extra.items()}}
        if (fits & (self.reach({k: v.float() for k, v in stored.items()}) > FP16_MAX)).any():
            raise NumericsError(f"{name!r}: a block whose values fit float16 would dequantize past "
                                f"its maximum {FP16_MAX:g} (the fp16 scale rounds up; llama.cpp "
                                "returns Inf there); scale such K/V down or use an int format")
        meta = {k: granularity.to_meta(v) for k, v in stored.items()}
        return granularity.unview(codes.to(torch.uint8), x.shape), meta

    def dequantize(self, codes, meta, granularity):
        cg = granularity.view(codes).float().sub_(self.offset)
        out = cg.mul_(granularity.from_meta(meta["scale"].float()))
        if "zero" in meta:
            out = out.add_(granularity.from_meta(meta["zero"].float()))
        return granularity.unview(out, codes.shape)

    def meta_bits(self, groups):
        return groups * 16 * self.stored

    # the format ------------------------------------------------------------------------------
    def block_scale(self, xg: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """float32 d (B, H, T, D // 32, 1) before fp16 rounding, plus extra stored metadata."""
        raise NotImplementedError

    def round(self, v: torch.Tensor, meta: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unsigned codes (float) from v = x * (1 / d), in place."""
        raise NotImplementedError

    def reach(self, meta: dict[str, torch.Tensor]) -> torch.Tensor:
        """Largest |value| a block can dequantize to, from its ``scale`` (and ``zero``)."""
        raise NotImplementedError


class Q4_0(GGMLQuantizer):
    """llama.cpp q4_0: 32 values, fp16 scale, 4-bit codes in [-8, 7] (4.5 bits/element)."""

    type: Literal["q4_0"] = "q4_0"
    bits: ClassVar[int] = 4
    offset: ClassVar[int] = 8

    def block_scale(self, xg):
        imax = xg.abs().argmax(dim=-1, keepdim=True)  # first of equal magnitudes, as numpy
        return xg.gather(-1, imax) / -8, {}

    def round(self, v, meta):
        return v.add_(8.5).trunc_().clamp_(0, 15)

    def reach(self, meta):
        return 8 * meta["scale"].abs()


class Q4_1(GGMLQuantizer):
    """llama.cpp q4_1: 32 values, fp16 scale and minimum, 4-bit codes in [0, 15] (5 bits)."""

    type: Literal["q4_1"] = "q4_1"
    bits: ClassVar[int] = 4
    offset: ClassVar[int] = 0
    stored: ClassVar[int] = 2

    def block_scale(self, xg):
        lo, hi = xg.amin(dim=-1, keepdim=True), xg.amax(dim=-1, keepdim=True)
        d = (hi - lo) / 15
        _check_range(d, lo, hi, self.spec_name())
        xg.sub_(lo)  # round() sees (x - min) / d
        return d, {"zero": lo}

    def round(self, v, meta):
        return v.add_(0.5).trunc_().clamp_(0, 15)

    def reach(self, meta):
        return torch.maximum(meta["zero"].abs(), (15 * meta["scale"] + meta["zero"]).abs())


class Q8_0(GGMLQuantizer):
    """llama.cpp q8_0: 32 values, fp16 scale, 8-bit codes in [-127, 127] (8.5 bits/element)."""

    type: Literal["q8_0"] = "q8_0"
    bits: ClassVar[int] = 8
    offset: ClassVar[int] = 128

    def block_scale(self, xg):
        return xg.abs().amax(dim=-1, keepdim=True) / 127, {}

    def round(self, v, meta):
        # ggml's roundf (half away from zero), computed as gguf's np_roundf does: exact in fp32
        a = v.abs()
        f = a.floor()
        q = f.add_(a.sub_(f).mul_(2).floor_())  # a - f is exact, so is 2 * (a - f)
        return q.copysign_(v).clamp_(-127, 127).add_(self.offset)

    def reach(self, meta):
        return 127 * meta["scale"].abs()


class Blocks(Group):
    """``group(32)`` of a ggml format: its shape error names the format's fixed block size."""

    def check(self, shape):
        if shape[-1] % BLOCK:
            raise KVQError(f"llama.cpp's block formats (q4_0, q4_1, q8_0) quantize blocks of "
                           f"{BLOCK} channels, but head_dim is {shape[-1]}, not a multiple of "
                           f"{BLOCK}; use an int format for this model, e.g. "
                           f"'group({_divisor(shape[-1])})>int4(asym)'")
        super().check(shape)


def _divisor(d: int) -> int:
    return max(g for g in (1, 2, 4, 8, 16) if d % g == 0)


def _check_range(d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, name: str) -> None:
    """Raise when max - min overflows float32 although both are finite (bf16-range inputs)."""
    if not torch.isfinite(d).all() and torch.isfinite(lo).all() and torch.isfinite(hi).all():
        raise NumericsError(f"{name!r}: a block's range max - min overflows float32; "
                            "these values cannot be stored in llama.cpp's fp16 block formats")


def _fp16(x: torch.Tensor, what: str, name: str) -> torch.Tensor:
    """float32 block metadata -> float16 (ggml's scale dtype); raise if a finite value overflows."""
    out = x.to(torch.float16)
    if (torch.isinf(out) & torch.isfinite(x)).any():
        big = x[torch.isfinite(x)].abs().max().item()
        raise NumericsError(f"{name!r}: a block {what} of {big:.4g} overflows float16 (max 65504), "
                            "the scale dtype of llama.cpp's block formats; use an int format with "
                            "fp32 metadata instead, e.g. 'group(32)>int8(dtype=fp32)'")
    return out
