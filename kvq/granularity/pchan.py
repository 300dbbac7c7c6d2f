"""Per-channel scaling (pchan): one scale per channel over all tokens of the block.

Outlier channels (8-100x larger than the rest, e.g. Qwen2-7B layer 0 keys) get their own scale
instead of hijacking everyone's. A statistic over tokens: streaming caches quantize in blocks.
"""

from __future__ import annotations

from typing import Literal

from kvq.granularity.base import Granularity, amax_reduce


class PerChannel(Granularity):
    """Statistics over seq for every channel. Metadata: (batch, kv_heads, 1, head_dim)."""

    type: Literal["pchan"] = "pchan"
    @property
    def token_axis(self) -> bool:
        return True

    def reduce(self, x, op):
        return amax_reduce(x, op, -2)

    def expand(self, stat, shape):
        return stat

    def groups(self, seq, head_dim):
        return head_dim
