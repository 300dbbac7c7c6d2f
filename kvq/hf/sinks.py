"""SinkStore: the first ``n`` real tokens of every sequence of one layer, kept exact.

Attention sinks (StreamingLLM, IntactKV, KVQuant) are the first tokens of a sequence: attention
puts much weight on them and their K/V are often outliers. A layer with ``sinks=n`` copies the K/V
of the first ``n`` *real* tokens of each row here as they are written (with left padding, row b's
first real tokens sit after its pads; the padding mask says where). The quantized blocks still
hold those positions (blocks are rectangular), but they are kept out of token-axis statistics
and :meth:`SinkStore.overwrite` puts the exact values back into what attention reads.

Storage per layer: keys (B, H, s, D) and values (B, H, s, Dv) in the model dtype, and the
position of each sink, (B, s) int64 (-1 while a row has fewer real tokens), where
``s <= n`` grows with the sinks seen so far.
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
        if real is None:
            real = torch.ones(b, t, dtype=torch.bool, device=k.device)
        real = real.to(k.device)
        if self.pos is None:
            have = torch.zeros(b, 1, dtype=torch.long, device=k.device)
        else:
            have = (self.pos >= 0).sum(dim=1, keepdim=True)  # (B, 1)
        self._grow(min(self.n, int((have[:, 0] + real.sum(dim=1)).max())), k, v)
        slot = have + real.long().cumsum(dim=1) - 1  # sink slot of each real token
        take = real & (slot < self.pos.shape[1])
        if not bool(take.any()):
            return
        rows, cols = take.nonzero(as_tuple=True)
        slots = slot[rows, cols]
        self.pos[rows, slots] = start + cols
        self.k[rows, :, slots] = k[rows, :, cols]
        self.v[rows, :, slots] = v[rows, :, cols]

    def _grow(self, slots: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Room for ``slots`` sinks per row (storage follows the sinks seen, never ``n``
        up front: ``sinks=2_000_000`` on a 6-token prompt holds 6)."""
        if self.pos is not None and self.pos.shape[1] >= slots:
            return
        b, h = k.shape[:2]
        pos = torch.full((b, slots), -1, dtype=torch.long, device=k.device)
        nk, nv = k.new_zeros((b, h, slots, k.shape[-1])), v.new_zeros((b, h, slots, v.shape[-1]))
        if self.pos is not None:
            old = self.pos.shape[1]
            pos[:, :old], nk[:, :, :old], nv[:, :, :old] = self.pos, self.k, self.v
        self.pos, self.k, self.v = pos, nk, nv

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
