"""Metadata dtypes by their spec spelling."""

from __future__ import annotations

from typing import Literal

import torch

from kvq.errors import NumericsError

MetaDtype = Literal["fp16", "bf16", "fp32"]

TORCH_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16,
                                        "fp32": torch.float32}
BITS: dict[str, int] = {"fp16": 16, "bf16": 16, "fp32": 32}


def store(x: torch.Tensor, dtype: MetaDtype, what: str) -> torch.Tensor:
    """Cast metadata to its storage dtype; raise if a finite value overflows it.

    x: fp32 tensor of any shape. Returns the stored tensor (dtype ``dtype``).
    """
    out = x.to(TORCH_DTYPES[dtype])
    if dtype == "fp16" and (torch.isinf(out) & torch.isfinite(x)).any():
        big = x[torch.isfinite(x)].abs().max().item()
        raise NumericsError(f"{what} {big:.4g} overflows float16 (max 65504); store it as bf16 or "
                            f"fp32 instead, e.g. 'nsep(dtype=fp32)' or 'int4(dtype=bf16)'")
    return out
