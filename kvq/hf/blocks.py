"""BlockStore: the quantized, bit-packed token blocks of one K or V stream of one layer.

Tokens arrive in whole blocks of ``L`` tokens and are quantized once, never again. ``n`` blocks of
one length are folded into the head axis, so the whole stream quantizes and dequantizes in a
single pipeline call:

    x (B, H, n*L, D) -> (B, H*n, L, D) -> pipeline.quantize -> QuantizedTensor (B, H*n, L, ...)

Every statistic (per-channel scale, token groups, norms) is therefore taken over one block of one
sequence and one head. Blocks of the same length are kept in one *segment*; a block of another
length (a prompt tail) or a cropped segment starts a new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from kvq.hf.padding import fill_pads
from kvq.quantized import QuantizedTensor


@dataclass
class Segment:
    """``n`` quantized blocks of ``block`` tokens, folded: ``q.shape == (B, H*n, block, D)``.

    ``length`` tokens are live (fewer than ``n * block`` after a crop). ``extra`` holds what a
    reader derived from the blocks once, when they were written (folded like the metadata, e.g.
    the fast decode's nsep factor ``(B, H*n, block)``); it is counted in :attr:`nbytes`.
    """

    q: QuantizedTensor
    heads: int
    block: int
    length: int
    extra: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + sum(t.numel() * t.element_size() for t in self.extra.values())

    @property
    def n(self) -> int:
        return self.q.shape[1] // self.heads

    @property
    def full(self) -> bool:
        return self.length == self.n * self.block


def _fold(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H, n, ...) -> (B, H*n, ...)."""
    return t.reshape(t.shape[0], heads * t.shape[2], *t.shape[3:])


def _unfold(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H*n, ...) -> (B, H, n, ...)."""
    return t.reshape(t.shape[0], heads, t.shape[1] // heads, *t.shape[2:])


def _map(q: QuantizedTensor, fn) -> QuantizedTensor:
    """Apply ``fn`` to codes and every metadata tensor (all are (B, H*n, ...))."""
    codes = fn(q.codes)
    meta = {k: fn(v) for k, v in q.meta.items()}
    return replace(q, codes=codes, meta=meta, shape=(codes.shape[0], *q.shape[1:]))


def _drop_blocks(s: Segment, k: int) -> Segment:
    """``s`` without its first ``k`` blocks, in fresh tensors (the old ones can be freed)."""
    def cut(t: torch.Tensor) -> torch.Tensor:
        return _fold(_unfold(t, s.heads)[:, :, k:].clone(memory_format=torch.contiguous_format),
                     s.heads)

    q = replace(s.q, codes=cut(s.q.codes), meta={n: cut(t) for n, t in s.q.meta.items()},
                shape=(s.q.shape[0], s.heads * (s.n - k), *s.q.shape[2:]))
    return Segment(q, s.heads, s.block, s.length - k * s.block,
                   {n: cut(t) for n, t in s.extra.items()})


class BlockStore:
    """Quantized blocks of one stream (keys or values) of one layer, oldest first."""

    def __init__(self, pipeline, backend: str = "auto"):
        self.pipeline = pipeline
        self.backend = backend
        self.segments: list[Segment] = []

    def __len__(self) -> int:
        """Live tokens held."""
        return sum(s.length for s in self.segments)

    @property
    def nbytes(self) -> int:
        """Bytes really held: packed codes and all metadata (cropped tokens included)."""
        return sum(s.nbytes for s in self.segments)

    def append(self, x: torch.Tensor, block: int, valid: torch.Tensor | None = None,
               derive=None) -> QuantizedTensor:
        """Quantize ``x`` (B, H, n*block, D) as ``n`` blocks and append them.

        ``valid`` (B, n*block) bool marks real tokens; pad rows are excluded from token-axis
        statistics (see :func:`kvq.hf.padding.fill_pads`). ``derive``: ``QuantizedTensor ->
        dict`` of tensors kept beside the new blocks (``Segment.extra``). Returns the new
        blocks, folded.
        """
        b, h, t, d = x.shape
        n = t // block
        blocks = x.reshape(b, h, n, block, d)
        if valid is not None and self.pipeline.token_axis_stats and not bool(valid.all()):
            unit = self.pipeline.token_block or block
            if block % unit:
                unit = block
            blocks = fill_pads(blocks, valid.reshape(b, n, block), unit)
        q = self.pipeline.quantize(_fold(blocks, h), backend=self.backend)
        extra = derive(q) if derive is not None else {}
        last = self.segments[-1] if self.segments else None
        if last is not None and last.block == block and last.full:
            merged = replace(last.q, codes=self._cat(last.q.codes, q.codes, h),
                             meta={k: self._cat(v, q.meta[k], h) for k, v in last.q.meta.items()},
                             shape=(b, h * (last.n + n), block, d))
            # derived tensors continue only where both parts have them (else readers recompute)
            kept = {k: self._cat(v, extra[k], h) for k, v in last.extra.items()
                    if k in extra} if last.extra.keys() == extra.keys() else {}
            self.segments[-1] = Segment(merged, h, block, last.length + t, kept)
        else:
            self.segments.append(Segment(q, h, block, t, extra))
        return q

    @staticmethod
    def _cat(old: torch.Tensor, new: torch.Tensor, heads: int) -> torch.Tensor:
        return _fold(torch.cat([_unfold(old, heads), _unfold(new, heads)], dim=2), heads)

    def unfold(self, q: QuantizedTensor, heads: int, length: int | None = None) -> torch.Tensor:
        """Dequantize folded blocks back to (B, H, tokens, D), first ``length`` tokens."""
        x = self.pipeline.dequantize(q, backend=self.backend)
        b, hn, blk, d = x.shape
        x = x.reshape(b, heads, (hn // heads) * blk, d)
        return x if length is None else x[:, :, :length]

    def dequantize(self) -> list[torch.Tensor]:
        """Every live token, oldest first: one (B, H, tokens, D) tensor per segment."""
        return [self.unfold(s.q, s.heads, None if s.full else s.length) for s in self.segments]

    def crop(self, tokens: int) -> None:
        """Forget the newest ``tokens`` tokens. Whole segments are dropped; a partly cropped segment
        keeps its codes (its scales stay valid) and only its live length shrinks."""
        while tokens > 0 and self.segments:
            last = self.segments[-1]
            if tokens >= last.length:
                tokens -= last.length
                self.segments.pop()
            else:
                last.length -= tokens
                tokens = 0

    def drop_front(self, tokens: int) -> int:
        """Forget whole blocks among the oldest ``tokens`` tokens (sliding-window layers); a block
        with a token that stays is kept whole. The dropped codes and metadata are freed. Returns
        the number of tokens dropped (at most ``tokens``)."""
        done = 0
        while self.segments and tokens - done > 0:
            first = self.segments[0]
            if tokens - done >= first.length:
                done += first.length
                self.segments.pop(0)
                continue
            k = (tokens - done) // first.block
            if k:
                self.segments[0] = _drop_blocks(first, k)
                done += k * first.block
            break
        return done

    def map_batch(self, fn) -> None:
        """Apply a batch-axis op (index_select, repeat_interleave, indexing) to every tensor."""
        self.segments = [replace(s, q=_map(s.q, fn), extra={k: fn(v) for k, v in s.extra.items()})
                         for s in self.segments]

    def clear(self) -> None:
        self.segments = []
