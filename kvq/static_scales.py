"""Static KV-cache scales from calibration statistics, as llm-compressor and ModelOpt fit them.

A serving engine's FP8 KV cache divides K (after RoPE) and V by one scale per tensor or per KV
head, fitted offline and stored in the checkpoint. :class:`ScaleFit` accumulates one layer's K
or V over the calibration windows, in order, and returns the scale:

- observer ``minmax`` (llm-compressor 0.14's default for K/V, ``MinMaxObserver``): per window
  (one forward, batch 1) the min and max over the window (and heads, per tensor); running
  values ``m <- m * (1 - c) + new * c`` with ``c = 0.01`` after the first window.
- observer ``max`` (llm-compressor's ``static_minmax``; ModelOpt's max calibrator): the min and
  max over all windows.

Then, as compressed-tensors' ``calculate_qparams`` (symmetric float): ``min <- min(min, 0)``,
``max <- max(max, 0)``, ``scale = max(|min|, max) / fmax`` (448 for FP8 E4M3), a zero scale
replaced by fp32's eps. For NVFP4 (ModelOpt) the static scale is the second-level one,
``amax / (6 * 448)``, and the per-16 E4M3 block scales stay dynamic. Core module: it knows no
model; :mod:`kvq.eval.static_calibrate` feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvq.errors import SpecError

OBSERVERS = ("minmax", "max")
AVERAGING = 0.01  # llm-compressor MinMaxObserver averaging_constant


@dataclass(frozen=True)
class Recipe:
    """What ``kvq calibrate --recipe NAME`` fits: a scale per ``per`` with ``observer``."""

    spec: str  # quantizer spec with {src} for the reference
    per: str  # "tensor" | "head"
    observer: str
    fmax: float
    doc: str


_FP8 = "fp8(e4m3,static,source={src})"
RECIPES: dict[str, Recipe] = {
    "fp8-tensor": Recipe(_FP8, "tensor", "minmax", 448.0,
                         "FP8 E4M3, one scale per layer and K/V (llm-compressor default)"),
    "fp8-head": Recipe(_FP8, "head", "minmax", 448.0,
                       "FP8 E4M3, one scale per KV head (llm-compressor strategy attn_head)"),
    "fp8-tensor-max": Recipe(_FP8, "tensor", "max", 448.0,
                             "FP8 E4M3 per tensor, absmax over all windows (ModelOpt max)"),
    "fp8-head-max": Recipe(_FP8, "head", "max", 448.0,
                           "FP8 E4M3 per KV head, absmax over all windows"),
    "nvfp4": Recipe("group(16)>fp4(nv,scale=static,source={src})", "tensor", "max", 6 * 448.0,
                    "NVFP4, static second-level scale per layer and K/V (ModelOpt max)"),
}


class ScaleFit:
    """Running statistics of one layer's K or V -> its static scale (see module docstring)."""

    def __init__(self, per: str = "tensor", observer: str = "minmax",
                 averaging: float = AVERAGING):
        if per not in ("tensor", "head"):
            raise SpecError(f"per={per!r}: use 'tensor' or 'head'")
        if observer not in OBSERVERS:
            raise SpecError(f"observer={observer!r}: use one of {', '.join(OBSERVERS)}")
        self.per, self.observer, self.averaging = per, observer, averaging
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """x: (batch, kv_heads, seq, head_dim), one window (one engine forward)."""
        dims = (0, 1, 2, 3) if self.per == "tensor" else (0, 2, 3)
        x = x.float()
        lo, hi = x.amin(dim=dims), x.amax(dim=dims)
        if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
            raise SpecError("calibration K/V hold NaN or Inf; check the model and its dtype")
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif self.observer == "max":
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        else:
            c = self.averaging
            self.lo, self.hi = self.lo * (1.0 - c) + lo * c, self.hi * (1.0 - c) + hi * c

    def scale(self, fmax: float) -> torch.Tensor:
        """fp32 scale: () per tensor, (kv_heads,) per head."""
        if self.lo is None:
            raise SpecError("no calibration windows were added")
        lo = torch.clamp(self.lo, max=0.0)
        hi = torch.clamp(self.hi, min=0.0)
        s = torch.maximum(lo.abs(), hi) / fmax
        return torch.where(s == 0, torch.finfo(torch.float32).eps, s)
