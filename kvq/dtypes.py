"""Metadata dtypes by their spec spelling, and :func:`store`, the one place metadata is cast."""

from __future__ import annotations

from typing import Literal

import torch

from kvq.errors import NumericsError

MetaDtype = Literal["fp16", "bf16", "fp32"]

TORCH_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16,
                                        "fp32": torch.float32}
BITS: dict[str, int] = {"fp16": 16, "bf16": 16, "fp32": 32}

#: largest relative error :func:`store` accepts on a nonzero value in the subnormal range
SUBNORMAL_TOLERANCE = 0.125


def store(x: torch.Tensor, dtype: MetaDtype, what: str, *, round_up: bool = False,
          check_precision: bool = True) -> torch.Tensor:
    """Cast metadata to its storage dtype, refusing to lose it silently.

    x: fp32 tensor of any shape. Returns the stored tensor (dtype ``dtype``).

    * A finite value that overflows float16 raises :class:`NumericsError` naming the remedy.
    * Values below the dtype's smallest normal number (float16: 6.1e-5) keep only a few bits:
      with ``round_up`` (positive scales) they are rounded up, never down, so codes computed
      with the stored scale never clip and a nonzero scale never becomes 0; with
      ``check_precision``, a relative error above :data:`SUBNORMAL_TOLERANCE` raises
      :class:`NumericsError` (the remedy: fp32 metadata). Values in the normal range are cast
      exactly as ``x.to(dtype)``: nothing changes for ordinary inputs.
    """
    out = x.to(TORCH_DTYPES[dtype])
    if dtype == "fp32":
        return out
    if dtype == "fp16" and (torch.isinf(out) & torch.isfinite(x)).any():
        big = x[torch.isfinite(x)].abs().max().item()
        raise NumericsError(f"{what} {big:.4g} overflows float16 (max 65504); store it as bf16 or "
                            f"fp32 instead, e.g. 'nsep(dtype=fp32)' or 'int4(dtype=bf16)'")
    small = (x.abs() < torch.finfo(out.dtype).tiny) & (x != 0)
    if not (round_up or check_precision) or not bool(small.any()):
        return out
    if round_up:
        low = small & (out.float() < x)
        out = torch.where(low, torch.nextafter(out, torch.full_like(out, float("inf"))), out)
    if check_precision:
        err = ((out.float() - x).abs() / x.abs().clamp_min(1e-45))[small]
        if bool((err > SUBNORMAL_TOLERANCE).any()):
            worst = x[small][err.argmax()].item()
            raise NumericsError(
                f"{what} {worst:.3g} is too small for {dtype} metadata (relative error "
                f"{err.max().item():.0%}; smallest normal {torch.finfo(out.dtype).tiny:.3g}): the "
                f"input's magnitude is tiny; store metadata as fp32, e.g. 'int4(dtype=fp32)' or "
                f"'nsep(fp32)', or scale the K/V up")
    return out
