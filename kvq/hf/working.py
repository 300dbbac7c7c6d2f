"""WorkingCopy: a growing model-dtype buffer of what attention reads, for fast decode.

With ``keep_dequantized=True`` a layer keeps, besides its packed blocks, one (B, H, capacity, D)
buffer per stream: positions [0, quantized) hold the dequantized blocks (written once, when a block
is quantized), the rest the exact residual tokens. A decode step writes its new token in place and
returns a view of the first ``n`` positions, so nothing is copied or dequantized per step. The cost
is memory: the buffer is as large as an uncompressed cache (plus up to 25% spare capacity).
"""

from __future__ import annotations

import torch


class WorkingCopy:
    """(B, H, capacity, D) buffer; ``view(n)`` is positions [0, n)."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()

    def write(self, pos: int, x: torch.Tensor) -> None:
        """Store x (B, H, T, D) at positions [pos, pos + T), growing the buffer if needed."""
        end = pos + x.shape[-2]
        if self.buf is None or end > self.buf.shape[-2]:
            cap = end + max(256, end // 4)  # amortised growth, at most 25% (or 256 tokens) spare
            new = x.new_empty((*x.shape[:2], cap, x.shape[-1]))
            if self.buf is not None:
                new[:, :, :pos] = self.buf[:, :, :pos]
            self.buf = new
        self.buf[:, :, pos:end] = x

    def view(self, n: int) -> torch.Tensor:
        return self.buf[:, :, :n]

    def drop_front(self, n: int) -> None:
        """Forget positions [0, n): the rest moves to the front (sliding-window layers)."""
        if self.buf is not None:
            self.buf = self.buf[:, :, n:].clone(memory_format=torch.contiguous_format)

    def map_batch(self, fn) -> None:
        if self.buf is not None:
            self.buf = fn(self.buf)

    def clear(self) -> None:
        self.buf = None
