"""Attention sinks on the fast decode path: the exact first tokens as a segment of their own.

A layer with ``sinks=n`` keeps the K/V of each row's first ``n`` real tokens exact beside the
blocks (:mod:`kvq.hf.sinks`), and the general path writes them over the dequantized layer. The
fast path reads the blocks as stored, so for the sinks among the visible quantized tokens it
replaces their scores by ``q . k_sink`` before the softmax, takes their probabilities out of the
value pass (weight 0 on the dequantized rows) and adds ``p_sink * v_sink`` to the output: the
same attention as over the overwritten layer. Sinks in the exact window are already exact.
"""

from __future__ import annotations

import torch


class SinkRead:
    """The sinks of one layer at held positions [start, end) of the quantized blocks, per row.
    ``offset``: tokens the layer dropped before its first held one (sliding windows); sink
    positions are absolute, so held token ``t`` is token ``t + offset``."""

    def __init__(self, store, start: int, end: int, offset: int = 0):
        pos = store.pos
        live = (pos >= start + offset) & (pos < end + offset)
        rows, slots = live.nonzero(as_tuple=True)
        self.rows, self.cols = rows, pos[rows, slots] - (start + offset)
        self.k = store.k[rows, :, slots].float()  # (N, H, D)
        self.v = store.v[rows, :, slots].float()  # (N, H, Dv)

    @classmethod
    def of(cls, layer, start: int, end: int) -> SinkRead | None:
        """The layer's sinks at held positions [start, end), or None when there are none."""
        store = layer.sink_store
        if not layer.sinks or store.pos is None:
            return None
        found = cls(store, start, end, getattr(layer, "dropped", 0))
        return found if found.rows.numel() else None

    def set_scores(self, scores: torch.Tensor, q: torch.Tensor) -> None:
        """scores (B, H, G, visible), q (B, H, G, D) scaled: the sinks' scores become exact."""
        exact = torch.einsum("nhgd,nhd->nhg", q[self.rows], self.k)
        scores[self.rows, :, :, self.cols] = exact

    def take_weights(self, p: torch.Tensor) -> torch.Tensor:
        """The sinks' probabilities (N, H, G), zeroed in ``p`` (B, H, G, visible)."""
        w = p[self.rows, :, :, self.cols]
        p[self.rows, :, :, self.cols] = 0
        return w

    def add_values(self, out: torch.Tensor, weights: torch.Tensor) -> None:
        """out (B, H, G, Dv) += p_sink * v_sink, per row."""
        out.index_put_((self.rows,), weights.unsqueeze(-1) * self.v.unsqueeze(2),
                       accumulate=True)
