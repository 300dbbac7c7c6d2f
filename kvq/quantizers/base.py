"""Base class of quantizers."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvq.granularity.base import Granularity
from kvq.spec.step import Step


class Quantizer(Step):
    """Turns fp32 (batch, kv_heads, seq, head_dim) into integer codes plus metadata.

    ``quantize`` returns unsigned codes (uint8, same shape as x) and metadata tensors in the
    granularity's layout, and may overwrite x (a temporary owned by the backend);
    ``dequantize`` inverts it.
    """

    role: ClassVar[str] = "quantizer"

    def quantize(self, x: torch.Tensor, granularity: Granularity
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def dequantize(self, codes: torch.Tensor, meta: dict[str, torch.Tensor],
                   granularity: Granularity) -> torch.Tensor:
        raise NotImplementedError

    def resolve_granularity(self, given: Granularity | None) -> Granularity:
        """The granularity this quantizer runs with: ``given`` (the spec's), else per token.

        A format that fixes its own blocks (llama.cpp's ``q4_0``) returns them, and raises
        :class:`~kvq.errors.SpecError` for a granularity that contradicts them.
        """
        from kvq.granularity.ptok import PerToken

        return given if given is not None else PerToken()

    def meta_bits(self, groups: int) -> float:
        """Bits of metadata for ``groups`` scale groups."""
        return 0.0
