"""Keep pad positions out of token-axis statistics.

``cache.update`` never sees the attention mask, so the cache is told which positions are real
tokens (``KVQCache.set_padding`` / ``KVQCache.watch``). Before a block is quantized, each pad row is
replaced by a real row of the same sequence, block and token group: a duplicate can neither raise a
per-channel max nor lower a min, so the statistics are those of the real tokens alone. Pad rows
come back as that real token's values; attention masks them out anyway.
"""

from __future__ import annotations

import torch


def fill_pads(blocks: torch.Tensor, valid: torch.Tensor, unit: int) -> torch.Tensor:
    """Replace pad rows by the first real row of their token group.

    blocks: (B, H, n, L, D); valid: (B, n, L) bool; unit: tokens per statistic group (divides L;
    L for per-channel-over-the-block scales). A group without any real token is left as it is:
    its statistics only serve its own (masked) pad rows.
    """
    b, h, n, blk, d = blocks.shape
    g = blk // unit
    valid = valid.to(blocks.device).reshape(b, n, g, unit)
    pos = torch.arange(unit, device=blocks.device).expand(b, n, g, unit)
    first = valid.int().argmax(dim=-1, keepdim=True)  # first real row, 0 when none
    src = torch.where(valid | ~valid.any(dim=-1, keepdim=True), pos, first)  # row in its group
    src = src + (torch.arange(g, device=blocks.device) * unit).reshape(1, 1, g, 1)  # row in block
    return blocks.gather(3, src.reshape(b, 1, n, blk, 1).expand(b, h, n, blk, d))
