"""Grouped scaling: groups of ``size`` channels per token, or ``size`` tokens per channel.

``group(32)`` / ``group(32,channel)``: per token, head_dim split in groups of 32 channels
(KIVI values, HF quanto). ``group(32,token)``: per channel, seq split in blocks of 32 tokens
(KIVI keys); a last, shorter token group is allowed.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvq.errors import KVQError
from kvq.granularity.base import Granularity

#: largest group: 64k channels or tokens (a bigger token group would pad every block to it)
MAX_SIZE = 1 << 16


class Group(Granularity):
    """Groups of ``size`` channels (per token) or ``size`` tokens (per channel).

    Metadata: (batch, kv_heads, seq, head_dim // size) along channels, or
    (batch, kv_heads, ceil(seq / size), head_dim) along tokens.
    """

    type: Literal["group"] = "group"
    size: int = Field(gt=0, le=MAX_SIZE, description="elements per group")
    axis: Literal["channel", "token"] = "channel"

    positional = ("size", "axis")

    @property
    def token_axis(self) -> bool:
        return self.axis == "token"

    @property
    def reduce_dim(self) -> int:
        return -1 if self.axis == "channel" else -2

    def check(self, shape):
        if self.axis == "channel" and shape[-1] % self.size:
            raise KVQError(f"group size {self.size} does not divide head_dim {shape[-1]}; "
                           f"use a divisor such as {_divisor_near(shape[-1], self.size)}")
        super().check(shape)

    def view_shape(self, shape):
        b, h, t, d = shape
        if self.axis == "channel":
            return (b, h, t, d // self.size, self.size)
        return (b, h, -(-t // self.size), self.size, d)

    def view(self, x):
        if self.axis == "token":
            x = _pad_tokens(x, self.size)
        return x.reshape(self.view_shape(x.shape))

    def unview(self, xg, shape):
        b, h, t, d = shape
        if self.axis == "channel":
            return xg.reshape(shape)
        return xg.reshape(b, h, -1, d)[..., :t, :]

    def to_meta(self, stat):
        return stat.squeeze(self.reduce_dim)

    def from_meta(self, meta):
        return meta.unsqueeze(self.reduce_dim)

    def groups(self, seq, head_dim):
        if self.axis == "channel":
            return seq * (head_dim // self.size)
        return -(-seq // self.size) * head_dim

    def token_block(self):
        return self.size if self.axis == "token" else None


def _pad_tokens(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad seq to a multiple of ``size`` by repeating the last token (leaves min/max unchanged)."""
    pad = -x.shape[-2] % size
    if pad == 0:
        return x
    return torch.cat([x, x[..., -1:, :].expand(*x.shape[:-2], pad, x.shape[-1])], dim=-2)


def _divisor_near(n: int, size: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - size))
