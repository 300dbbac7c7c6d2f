"""Classify a layer by what breaks naive quantization there (thresholds: docs/diagnose.md).

- **Mode 1** (outlier channels): the largest post-RoPE key channel absmax is at least
  ``MODE1_RATIO`` times the median channel's in some KV head. At 8x, per-token absmax INT4
  (qmax 7) gives the median channel less than one quantization step: it rounds to 0 or ±1 step.
- **Mode 2** (token-norm variation): the coefficient of variation of token L2 norms is at least
  ``MODE2_CV`` in the keys or values of some KV head, so a scale shared over the tokens of a
  block (per-channel scales) leaves the small-norm tokens few levels.
- **both** / **benign**: both or neither.
"""

from __future__ import annotations

MODE1_RATIO = 8.0
MODE2_CV = 0.3
MODES = ("Mode 1", "Mode 2", "both", "benign")


def classify(keys: dict[str, list[float]], values: dict[str, list[float]],
             mode1_ratio: float = MODE1_RATIO, mode2_cv: float = MODE2_CV) -> str:
    """Mode of one layer from the per-head statistics of its keys and values (stats.head_stats)."""
    m1 = max(keys["outlier_ratio"]) >= mode1_ratio
    m2 = max(keys["norm_cv"] + values["norm_cv"]) >= mode2_cv
    return {(True, True): "both", (True, False): "Mode 1", (False, True): "Mode 2",
            (False, False): "benign"}[(m1, m2)]
