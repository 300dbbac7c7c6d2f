"""Base class of granularities: how scales are shared over (seq, head_dim)."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvq.errors import KVQError
from kvq.spec.step import Step


class Granularity(Step):
    """Maps a (batch, kv_heads, seq, head_dim) tensor to per-group statistics and back.

    :meth:`view` groups the tensor so that a statistic reduces over ``reduce_dim``;
    :meth:`to_meta` / :meth:`from_meta` convert statistics to the stored layout and back;
    :meth:`expand` broadcasts stored metadata to the full input shape.
    """

    role: ClassVar[str] = "granularity"

    @property
    def token_axis(self) -> bool:
        """True when a statistic is taken over several tokens (streaming needs token blocks)."""
        return False

    #: dim of :meth:`view` that a statistic reduces over
    reduce_dim: ClassVar[int] = -1

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, kv_heads, seq, head_dim) -> grouped view; groups run along ``reduce_dim``."""
        return x

    def unview(self, xg: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`view` back to ``shape``."""
        return xg.reshape(shape)

    def to_meta(self, stat: torch.Tensor) -> torch.Tensor:
        """Statistic of the grouped view (reduce_dim kept) -> stored metadata layout."""
        return stat

    def from_meta(self, meta: torch.Tensor) -> torch.Tensor:
        """Stored metadata -> tensor broadcasting against the grouped view."""
        return meta

    def view_shape(self, shape: torch.Size) -> tuple[int, ...]:
        """Shape of :meth:`view` for an input of ``shape``."""
        return tuple(shape)

    def expand(self, stat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Metadata broadcast back to a full (B, H, T, D) tensor."""
        return self.unview(self.from_meta(stat).expand(self.view_shape(shape)), shape)

    def groups(self, seq: int, head_dim: int) -> int:
        """Number of scale entries for one head's (seq, head_dim) block."""
        raise NotImplementedError

    def token_block(self) -> int | None:
        """Tokens per statistic when fixed (streaming flushes must be a multiple of it)."""
        return None

    def check(self, shape: torch.Size) -> None:
        """Raise :class:`KVQError` when the input shape does not fit this granularity."""
        if self.token_axis and shape[-2] < 2:
            raise KVQError(f"'{self.to_spec()}' takes statistics over tokens but got "
                           f"seq={shape[-2]}; "
                           "quantize blocks of tokens (kvq.hf.KVQCache keeps a residual window) "
                           "or use a per-token granularity such as 'ptok'")

