"""Per-token scaling (ptok): one scale per token over head_dim (the seed's "naive" absmax)."""

from __future__ import annotations

from typing import Literal

from kvq.granularity.base import Granularity, amax_reduce


class PerToken(Granularity):
    """Statistics over head_dim for every token. Metadata: (batch, kv_heads, seq, 1)."""

    type: Literal["ptok"] = "ptok"

    def reduce(self, x, op):
        return amax_reduce(x, op, -1)

    def expand(self, stat, shape):
        return stat

    def groups(self, seq, head_dim):
        return seq
