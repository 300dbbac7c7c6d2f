"""Per-head scaling (phead): one scale per (batch, head) over every token and channel it is given.

FP8 KV caches keep one scale per head (or per tensor) rather than per token. kvq has no offline
calibration, so the scale is a statistic of the block being quantized: in a
:class:`kvq.hf.KVQCache`, one scale per head and cache block of tokens.
"""

from __future__ import annotations

from typing import Literal

from kvq.granularity.base import Granularity


class PerHead(Granularity):
    """Statistics over (seq, head_dim) per (batch, head). Metadata: (batch, kv_heads, 1, 1)."""

    type: Literal["phead"] = "phead"

    @property
    def token_axis(self) -> bool:
        return True

    reduce_dim = -1

    def view_shape(self, shape):
        b, h, t, d = shape
        return (b, h, 1, t * d)

    def view(self, x):
        return x.reshape(self.view_shape(x.shape))

    def groups(self, seq, head_dim):
        return 1
