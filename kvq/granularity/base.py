"""Base class of granularities: how scales are shared over (seq, head_dim)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from kvq.errors import KVQError
from kvq.spec.step import Step

Reduction = Literal["absmax", "min", "max"]


class Granularity(Step):
    """Maps a (batch, kv_heads, seq, head_dim) tensor to per-group statistics and back.

    ``reduce`` returns statistics in the stored metadata layout; ``expand`` broadcasts them
    back to a tensor that broadcasts against the input.
    """

    role: ClassVar[str] = "granularity"
    @property
    def token_axis(self) -> bool:
        """True when a statistic is taken over several tokens (streaming needs token blocks)."""
        return False

    def reduce(self, x: torch.Tensor, op: Reduction) -> torch.Tensor:
        raise NotImplementedError

    def expand(self, stat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def groups(self, seq: int, head_dim: int) -> int:
        """Number of scale entries for one head's (seq, head_dim) block."""
        raise NotImplementedError

    def token_block(self) -> int | None:
        """Tokens per statistic when fixed (streaming flushes must be a multiple of it)."""
        return None

    def check(self, shape: torch.Size) -> None:
        """Raise :class:`KVQError` when the input shape does not fit this granularity."""
        if self.token_axis and shape[-2] < 2:
            raise KVQError(f"'{self.to_spec()}' takes statistics over tokens but got seq={shape[-2]}; "
                           "quantize blocks of tokens (kvq.hf.KVQCache keeps a residual window) "
                           "or use a per-token granularity such as 'ptok'")


def amax_reduce(x: torch.Tensor, op: Reduction, dim) -> torch.Tensor:
    """Reduce ``x`` over ``dim`` (kept) with ``op``."""
    if op == "absmax":
        return x.abs().amax(dim=dim, keepdim=True)
    if op == "min":
        return x.amin(dim=dim, keepdim=True)
    return x.amax(dim=dim, keepdim=True)
