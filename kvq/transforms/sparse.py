"""Dense-and-sparse outliers (sparse): keep the largest entries exactly, quantize the rest.

From KVQuant (Hooper et al., NeurIPS 2024, "per-vector dense-and-sparse quantization"): about 1%
of K/V entries set the quantization range; storing them exactly in a sparse side store lets the
following steps quantize the other 99% with a much tighter range. Written first so that norms
(``nsep``) and scales never see the outliers: ``sparse(0.01)>pchan>int3``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from kvq import dtypes
from kvq.transforms.base import Transform


class Sparse(Transform):
    """Move the top ``frac`` of entries into a sparse store of exact values plus indices.

    ``over`` picks what a fixed count ``k`` of outliers is chosen from:

    - ``token``: each token's ``head_dim`` entries, ``k = ceil(frac * head_dim)`` largest |x|
      (per-token pipelines: values).
    - ``block``: the whole (seq, head_dim) block of one head, ``k = ceil(frac * seq * head_dim)``
      largest |x| (one quantize call; the HF cache quantizes blocks of 32 tokens).
    - ``channel``: per block like ``block``, ranked by ``|x - mean_c| / std_c`` over the block's
      tokens, i.e. the entries that stretch their own channel's range most (per-channel
      pipelines: keys).

    These are kvq's own rules, not KVQuant's: KVQuant keeps *every* key entry outside static
    per-channel thresholds calibrated offline (its 0.5 / 99.5 percentiles: a variable count)
    and picks value outliers by two-sided inclusive quantiles over the whole v_proj row (all
    heads of a token). On the same data only part of the positions coincide (issue 19: 18-24 of
    44-56 key outliers); see docs/parity.md.

    Removed entries are replaced by the median of the remaining entries of their token
    (``token``) or channel (``block``, ``channel``), so they widen no scale; dequantize scatters
    the stored values back over them. Metadata: ``outlier_values`` at ``dtype`` and
    ``outlier_index`` (position in the row for ``token``: (B, H, seq, k); flat ``t * head_dim +
    c`` for the others: (B, H, 1, k)), uint8 when positions fit 8 bits, else int16 or int32. The
    count per row is fixed, so no row offsets are stored. Values are exact when the input is
    representable at ``dtype`` (fp16 K/V with the default; use ``dtype=fp32`` for fp32).
    """

    type: Literal["sparse"] = "sparse"
    frac: float = Field(gt=0, le=0.5, description="fraction of entries kept exactly")
    over: Literal["token", "block", "channel"] = "token"
    dtype: dtypes.MetaDtype = "fp16"

    positional = ("frac", "over", "dtype")

    @property
    def token_axis(self) -> bool:
        return self.over != "token"

    def count(self, seq: int, head_dim: int) -> tuple[int, int]:
        """(rows, outliers per row) for one head's (seq, head_dim) block."""
        if self.over == "token":
            return seq, math.ceil(self.frac * head_dim)
        return 1, math.ceil(self.frac * seq * head_dim)

    def forward(self, x):
        b, h, t, d = x.shape
        rows, k = self.count(t, d)
        flat = x if self.over == "token" else x.reshape(b, h, 1, t * d)
        idx = _score(x, self.over).reshape(flat.shape).topk(k, dim=-1, sorted=False).indices
        idx = idx.sort(dim=-1).values
        values = dtypes.store(flat.gather(-1, idx), self.dtype, "outlier value")
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True).reshape(x.shape)
        fill = x.masked_fill(mask, float("nan")).nanmedian(dim=-1 if self.over == "token" else -2,
                                                           keepdim=True).values
        x = torch.where(mask, fill.nan_to_num_(0.0), x)
        return x, {"outlier_values": values, "outlier_index": idx.to(_index_dtype(flat.shape[-1]))}

    def inverse(self, x, meta):
        shape = x.shape
        flat = x.contiguous()
        if self.over != "token":
            flat = flat.reshape(shape[0], shape[1], 1, shape[2] * shape[3])
        idx = meta["outlier_index"].long()
        return flat.scatter_(-1, idx, meta["outlier_values"].float()).reshape(shape)

    def meta_bits(self, seq, head_dim):
        rows, k = self.count(seq, head_dim)
        width = head_dim if self.over == "token" else seq * head_dim
        index_bits = torch.iinfo(_index_dtype(width)).bits
        return rows * k * (dtypes.BITS[self.dtype] + index_bits)


def _score(x: torch.Tensor, over: str) -> torch.Tensor:
    """Outlier score of every entry, (B, H, seq, head_dim)."""
    if over != "channel":
        return x.abs()
    mean = x.mean(dim=-2, keepdim=True)
    std = x.std(dim=-2, keepdim=True, correction=0)
    return (x - mean).abs_().div_(torch.where(std > 0, std, torch.ones_like(std)))


def _index_dtype(positions: int) -> torch.dtype:
    """Smallest integer dtype that holds positions 0..positions-1."""
    if positions <= 256:
        return torch.uint8
    return torch.int16 if positions <= 2**15 else torch.int32
