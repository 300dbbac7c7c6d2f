"""Base class of invertible transforms (steps before the granularity and the quantizer)."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvq.spec.step import Step


class Transform(Step):
    """An invertible map on (batch, kv_heads, seq, head_dim) fp32 tensors.

    ``forward`` returns the transformed tensor and the metadata it needs to invert
    (stored, counted in ``nbytes``); ``inverse`` undoes it on the dequantized tensor. Both may
    work in place: their input is a temporary owned by the backend.
    """

    role: ClassVar[str] = "transform"
    @property
    def token_axis(self) -> bool:
        """True when the metadata is a statistic over tokens (streaming needs token blocks)."""
        return False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def inverse(self, x: torch.Tensor, meta: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def meta_bits(self, seq: int, head_dim: int) -> float:
        """Bits of metadata stored for one head's (seq, head_dim) block."""
        return 0.0
