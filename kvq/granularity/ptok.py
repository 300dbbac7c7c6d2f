"""Per-token scaling (ptok): one scale per token over head_dim (the seed's "naive" absmax)."""

from __future__ import annotations

from typing import Literal

from kvq.granularity.base import Granularity


class PerToken(Granularity):
    """Statistics over head_dim for every token. Metadata: (batch, kv_heads, seq, 1)."""

    type: Literal["ptok"] = "ptok"

    reduce_dim = -1

    def groups(self, seq, head_dim):
        return seq
