"""Per-channel mean centering over the tokens of a block."""

from __future__ import annotations

from typing import Literal

import torch

from kvq import dtypes
from kvq.transforms import Transform


class Center(Transform):
    """x -> x - mean over tokens, per channel. Metadata ``mean``: (batch, kv_heads, 1, head_dim)."""

    type: Literal["center"] = "center"
    dtype: dtypes.MetaDtype = "fp16"

    positional = ("dtype",)

    @property
    def token_axis(self) -> bool:
        return True

    def forward(self, x: torch.Tensor):
        mean = dtypes.store(x.mean(dim=-2, keepdim=True), self.dtype, "channel mean")
        return x - mean.float(), {"mean": mean}

    def inverse(self, x: torch.Tensor, meta):
        return x + meta["mean"].float()

    def meta_bits(self, seq: int, head_dim: int) -> float:
        return head_dim * dtypes.BITS[self.dtype]
