"""Storing per-group scales so that decoded values never exceed the group's absmax."""

from __future__ import annotations

import torch

from kvq import dtypes
from kvq.errors import NumericsError


def store_scale_down(scale: torch.Tensor, dtype: dtypes.MetaDtype, what: str) -> torch.Tensor:
    """Cast fp32 scales >= 0 to ``dtype`` rounding toward zero (never up).

    So ``top_level * stored <= absmax``: a decoded value cannot exceed the group's largest input
    (fp16 inputs near 65504 stay finite), while a scaled value may pass the top level by one
    rounding and then takes the top level. Raises :class:`NumericsError` when a finite scale
    overflows ``dtype`` or a nonzero one underflows to 0 (the group would decode to zeros).
    """
    stored = dtypes.store(scale, dtype, what)
    if dtype != "fp32":
        up = stored.float() > scale
        stored = torch.where(up, torch.nextafter(stored, torch.zeros_like(stored)), stored)
    if ((stored == 0) & (scale > 0)).any():
        tiny = scale[(stored == 0) & (scale > 0)].max().item()
        raise NumericsError(f"{what} {tiny:.3g} underflows {dtype} to 0; store it as fp32, "
                            "e.g. 'fp8(dtype=fp32)' or 'lloyd4(dtype=fp32)'")
    return stored


def scale_groups(x: torch.Tensor, g, top: float | torch.Tensor, dtype: dtypes.MetaDtype,
                 what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide x (B, H, T, D) in place so each granularity group's absmax lands on ``top``.

    Returns (the grouped view ``g.view(x) / s``, the stored scale ``s`` in the granularity's
    layout, ``absmax / top`` rounded toward zero by :func:`store_scale_down`; zero groups keep
    their zeros).
    """
    xg = g.view(x)
    amax = xg.abs().amax(dim=g.reduce_dim, keepdim=True)
    scale = store_scale_down(g.to_meta(amax / top), dtype, what)
    s = g.from_meta(scale).float()
    return xg.div_(torch.where(s == 0, torch.ones_like(s), s)), scale


def unscale_groups(values: torch.Tensor, scale: torch.Tensor, g) -> torch.Tensor:
    """Inverse of :func:`scale_groups`: values (B, H, T, D) times their group's stored scale."""
    return g.unview(g.view(values).mul_(g.from_meta(scale.float())), values.shape)
