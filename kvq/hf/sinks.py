"""SinkStore: the first ``n`` real tokens of every sequence of one layer, kept exact.

Attention sinks (StreamingLLM, IntactKV, KVQuant) are the first tokens of a sequence: attention
puts much weight on them and their K/V are often outliers. A layer with ``sinks=n`` copies the K/V
of the first ``n`` *real* tokens of each row here as they are written (with left padding, row b's
first real tokens sit after its pads; the padding mask says where). The quantized blocks still
hold those positions (blocks are rectangular), but they are kept out of token-axis statistics
and :meth:`SinkStore.overwrite` puts the exact values back into what attention reads.

Storage per layer: keys (B, H, n, D) and values (B, H, n, Dv) in the model dtype, and the
position of each sink, (B, n) int64 (-1 while a row has fewer than ``n`` real tokens).
"""

from __future__ import annotations

import torch


class SinkStore:
    """Exact K/V of the first ``n`` real tokens of each row."""

    def __init__(self, n: int):
        self.n = n
        self.pos: torch.Tensor | None = None  # (B, n) int64, -1 = not seen yet
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        if self.pos is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.pos, self.k, self.v))

    @property
    def tokens(self) -> int:
        """Sinks held per row (the most any row holds)."""
        return 0 if self.pos is None else int((self.pos >= 0).sum(dim=1).max())

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int,
              real: torch.Tensor | None) -> None:
        """Record sinks among new tokens k/v (B, H, T, D) at positions [start, start + T);
        ``real`` (B, T) bool marks real tokens (None: all real)."""
        if self.n == 0:
            return
        b, h, t, _ = k.shape
        if self.pos is None:
            self.pos = torch.full((b, self.n), -1, dtype=torch.long, device=k.device)
            self.k = k.new_zeros((b, h, self.n, k.shape[-1]))
            self.v = v.new_zeros((b, h, self.n, v.shape[-1]))
        if real is None:
            real = torch.ones(b, t, dtype=torch.bool, device=k.device)
        real = real.to(k.device)
        have = (self.pos >= 0).sum(dim=1, keepdim=True)  # (B, 1)
        slot = have + real.long().cumsum(dim=1) - 1  # sink slot of each real token
        take = real & (slot < self.n)
        if not bool(take.any()):
            return
        rows, cols = take.nonzero(as_tuple=True)
        slots = slot[rows, cols]
        self.pos[rows, slots] = start + cols
        self.k[rows, :, slots] = k[rows, :, cols]
        self.v[rows, :, slots] = v[rows, :, cols]

    def mask(self, start: int, length: int, batch: int, device) -> torch.Tensor | None:
        """(B, length) bool: True at sink positions in [start, start + length); None if none."""
        if self.pos is None:
            return None
        rel = self.pos - start
        inside = (self.pos >= 0) & (rel >= 0) & (rel < length)
        if not bool(inside.any()):
            return None
        out = torch.zeros(batch, length, dtype=torch.bool, device=device)
        rows, slots = inside.nonzero(as_tuple=True)
        out[rows, rel[rows, slots]] = True
        return out

    def overwrite(self, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        """Put the exact sinks into k/v (B, H, T, D), which hold positions [start, start + T)."""
        if self.pos is None:
            return
        rel = self.pos - start
        inside = (self.pos >= 0) & (rel >= 0) & (rel < k.shape[-2])
        if not bool(inside.any()):
            return
        rows, slots = inside.nonzero(as_tuple=True)
        cols = rel[rows, slots]
        k[rows, :, cols] = self.k[rows, :, slots]
        v[rows, :, cols] = self.v[rows, :, slots]

    def crop(self, length: int) -> None:
        """Forget sinks at positions >= ``length`` (they are written again when re-decoded)."""
        if self.pos is not None:
            gone = self.pos >= length
            self.pos = self.pos.masked_fill(gone, -1)

    def map_batch(self, fn) -> None:
        if self.pos is not None:
            self.pos, self.k, self.v = fn(self.pos), fn(self.k), fn(self.v)

    def clear(self) -> None:
        self.pos = self.k = self.v = None
