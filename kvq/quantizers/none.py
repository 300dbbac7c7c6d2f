"""The identity quantizer: stores K/V unchanged (a reference point, preset ``fp16``)."""

from __future__ import annotations

from typing import Literal

from kvq.quantizers.base import Quantizer


class NoQuantizer(Quantizer):
    """Keeps the input tensor as is, in its own dtype; dequantize returns it exactly."""

    type: Literal["none"] = "none"

    @property
    def bits(self) -> int:
        return 16

    def quantize(self, x, granularity):
        return x, {}

    def dequantize(self, codes, meta, granularity):
        return codes
