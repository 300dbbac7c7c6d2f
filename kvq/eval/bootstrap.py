"""Paired block bootstrap of ΔPPL and mean KL against the baseline run.

The scored tokens of a run (in the order the protocol scored them, windows one after the other)
are cut into blocks of ``block`` consecutive tokens that never cross a window. A resample draws
as many blocks as there are, with replacement, the *same* blocks for the pipeline and for the
baseline (paired: both runs scored the same text), and recomputes
``ΔPPL = exp(mean nll_q) - exp(mean nll_ref)`` and ``mean KL`` on them. The 95% interval is the
2.5th and 97.5th percentile of ``resamples`` such draws (fixed ``seed``, so reports repeat).
Blocks keep the correlation between neighbouring tokens inside a resample unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 128
RESAMPLES = 2000
SEED = 0


@dataclass
class Interval:
    low: float
    high: float


def block_ids(window_lengths: list[int], block: int = BLOCK) -> torch.Tensor:
    """Block index (T,) of every scored token: ``block``-token pieces of each window."""
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    ids, first = [], 0
    for n in window_lengths:
        local = torch.arange(n) // block
        ids.append(local + first)
        first += int(local[-1]) + 1 if n else 0
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)


def paired(nll: torch.Tensor, nll_ref: torch.Tensor, kl: torch.Tensor | None,
           blocks: torch.Tensor, resamples: int = RESAMPLES, seed: int = SEED,
           level: float = 0.95) -> dict[str, Interval | None]:
    """``{"delta_ppl": Interval, "kl": Interval | None}`` for per-token ``nll``, ``nll_ref``,
    ``kl`` (T,) and their ``blocks`` (T,) from :func:`block_ids`."""
    if not (nll.shape == nll_ref.shape == blocks.shape) or (kl is not None
                                                            and kl.shape != nll.shape):
        raise ValueError("per-token tensors and block ids must have the same length")
    n = int(blocks.max()) + 1 if blocks.numel() else 0
    if n == 0:
        return {"delta_ppl": None, "kl": None}
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, blocks, torch.ones_like(
        blocks, dtype=torch.float64))

    def sums(x):
        return torch.zeros(n, dtype=torch.float64).index_add_(0, blocks, x.double())

    gen = torch.Generator().manual_seed(seed)
    draw = torch.randint(n, (resamples, n), generator=gen)
    tokens = count[draw].sum(dim=1)
    q, ref = sums(nll)[draw].sum(dim=1) / tokens, sums(nll_ref)[draw].sum(dim=1) / tokens
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    out = {"delta_ppl": _interval(q.exp() - ref.exp(), lo, hi), "kl": None}
    if kl is not None:
        out["kl"] = _interval(sums(kl)[draw].sum(dim=1) / tokens, lo, hi)
    return out


def _interval(x: torch.Tensor, lo: float, hi: float) -> Interval:
    q = torch.quantile(x, torch.tensor([lo, hi], dtype=x.dtype))
    return Interval(float(q[0]), float(q[1]))
