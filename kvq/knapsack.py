"""Exact multiple-choice knapsack: one option per item, least total error within a cost budget.

Used to spend a bit budget over layers and K/V (``kvq tune``, ``kvq calibrate --bits``). Costs
are small integers (stored bits in some unit), so dynamic programming over the total cost is
exact and fast; a greedy or Lagrangian choice only reaches the convex hull of each item's
(cost, error) curve and can leave budget unused.
"""

from __future__ import annotations

import math

import numpy as np


def choose(items: list[list[tuple[int, float]]], cap: int) -> list[int] | None:
    """Per item the index of one ``(cost, error)`` option, total cost <= ``cap``, least total
    error; None when even the cheapest options exceed ``cap``. Costs are integers >= 0."""
    g = math.gcd(*(c for opts in items for c, _ in opts)) or 1
    cap //= g
    if sum(min(c for c, _ in opts) // g for opts in items) > cap:
        return None
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    picks = []
    for opts in items:
        new = np.full(cap + 1, np.inf)
        pick = np.full(cap + 1, -1, dtype=np.int32)
        for j, (c, err) in enumerate(opts):
            c //= g
            if c > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[c:] = dp[: cap + 1 - c] + err
            better = cand < new
            new[better], pick[better] = cand[better], j
        dp = new
        picks.append(pick)
    state = int(np.argmin(dp))
    out = []
    for opts, pick in zip(reversed(items), reversed(picks)):
        j = int(pick[state])
        out.append(j)
        state -= opts[j][0] // g
    return out[::-1]
