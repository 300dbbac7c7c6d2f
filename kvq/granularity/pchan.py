"""Per-channel scaling (pchan): one scale per channel over all tokens of the block.

Outlier channels (8-100x larger than the rest, e.g. Qwen2-7B layer 0 keys) get their own scale
instead of hijacking everyone's. A statistic over tokens: streaming caches quantize in blocks.
"""

from __future__ import annotations

from typing import Literal

from kvq.granularity.base import Granularity


class PerChannel(Granularity):
    """Statistics over seq for every channel. Metadata: (batch, kv_heads, 1, head_dim)."""

    type: Literal["pchan"] = "pchan"
    @property
    def token_axis(self) -> bool:
        return True

    reduce_dim = -2

    def groups(self, seq, head_dim):
        return head_dim
