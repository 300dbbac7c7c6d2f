"""Norm separation (nsep): keep each vector's L2 norm, quantize its unit direction.

From "Norm-Separated Quantization" (metaSATOKEN/norm-separated-quantization): token-wise norm
variation (2-5x in pre-LN models) is removed before scaling, so per-channel scales see
directions of equal length.
"""

from __future__ import annotations

from typing import Literal

import torch

from kvq import dtypes
from kvq.transforms.base import Transform


class NormSeparation(Transform):
    """x -> (||x||_2 per token, stored at ``dtype``; x / ||x||_2).

    Metadata ``norm``: (batch, kv_heads, seq, 1). Zero vectors keep norm 0 and direction 0.
    With ``renorm`` the dequantized direction is re-normalised to unit length before the norm
    is put back (as in the seed repo).
    """

    type: Literal["nsep"] = "nsep"
    renorm: bool = True
    dtype: dtypes.MetaDtype = "fp16"

    positional = ("dtype",)

    def forward(self, x):
        norm = x.norm(dim=-1, keepdim=True)
        stored = dtypes.store(norm, self.dtype, "token norm")
        direction = x.div_(torch.where(norm > 0, norm, torch.ones_like(norm)))
        return direction, {"norm": stored}

    def inverse(self, x, meta):
        # one per-token factor, applied in place: n / ||x|| (renorm) or n
        factor = meta["norm"].float()
        if self.renorm:
            length = x.norm(dim=-1, keepdim=True)
            factor = factor / torch.where(length > 0, length, torch.ones_like(length))
        return x.mul_(factor)

    def meta_bits(self, seq, head_dim):
        return seq * dtypes.BITS[self.dtype]
