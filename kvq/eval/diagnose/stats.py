"""Outlier statistics of one K or V tensor, per head: what makes a quantizer fail.

For ``x`` of shape (batch, kv_heads, seq, head_dim), every statistic is taken per head over all
tokens of all sequences:

- ``outlier_ratio``: largest channel absmax over the median channel absmax (Mode 1: a few
  channels much larger than the rest take over per-token scales);
- ``norm_max_min`` and ``norm_cv``: max/min and coefficient of variation (std/mean) of the
  tokens' L2 norms (Mode 2: norms vary across tokens, so a scale shared over tokens wastes levels
  on the small ones);
- ``kurtosis``: excess kurtosis of all the head's elements (0 for a Gaussian).
"""

from __future__ import annotations

import torch

from kvq.errors import KVQError

STATS = ("outlier_ratio", "norm_max_min", "norm_cv", "kurtosis")
_TINY = 1e-12


def head_stats(x: torch.Tensor) -> dict[str, list[float]]:
    """``{stat: [value per head]}`` for ``x`` (batch, kv_heads, seq, head_dim), computed in fp32."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise KVQError(f"expected a (batch, kv_heads, seq, head_dim) tensor, got {shape}")
    if x.shape[2] < 2:
        raise KVQError(f"statistics over tokens need at least 2 tokens, got seq={x.shape[2]}")
    h = x.float().transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])  # (heads, tokens, dim)
    return {
        "outlier_ratio": outlier_ratio(h).tolist(),
        "norm_max_min": norm_max_min(h).tolist(),
        "norm_cv": norm_cv(h).tolist(),
        "kurtosis": excess_kurtosis(h).tolist(),
    }


def outlier_ratio(h: torch.Tensor) -> torch.Tensor:
    """(heads, tokens, dim) -> (heads,): max over channels of absmax / median channel absmax."""
    amax = h.abs().amax(dim=1)
    return amax.amax(dim=-1) / amax.median(dim=-1).values.clamp_min(_TINY)


def norm_max_min(h: torch.Tensor) -> torch.Tensor:
    """(heads, tokens, dim) -> (heads,): largest token L2 norm over the smallest."""
    n = h.norm(dim=-1)
    return n.amax(dim=-1) / n.amin(dim=-1).clamp_min(_TINY)


def norm_cv(h: torch.Tensor) -> torch.Tensor:
    """(heads, tokens, dim) -> (heads,): std / mean of the token L2 norms."""
    n = h.norm(dim=-1)
    return n.std(dim=-1) / n.mean(dim=-1).clamp_min(_TINY)


def excess_kurtosis(h: torch.Tensor) -> torch.Tensor:
    """(heads, tokens, dim) -> (heads,): E[(x-mu)^4] / E[(x-mu)^2]^2 - 3 over all elements."""
    flat = h.reshape(h.shape[0], -1)
    z = flat - flat.mean(dim=-1, keepdim=True)
    var = z.pow(2).mean(dim=-1)
    return z.pow(4).mean(dim=-1) / var.pow(2).clamp_min(_TINY) - 3.0
