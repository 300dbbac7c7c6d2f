"""Calibrated non-uniform codebook quantizer (nuq), as in KVQuant (Hooper et al., NeurIPS 2024).

Each group (the granularity's: a channel over the block's tokens for ``pchan``, a token for
``ptok``) is normalized to [-1, 1] by its range, ``v = (x - zero) / scale`` with
``zero = (max + min) / 2`` and ``scale = (max - min) / 2`` (KVQuant's ``quant_fn_nuq_recon``), and
``v`` is coded as the nearest of ``2**bits`` levels fitted offline per layer and K/V by
``kvq calibrate`` (weighted k-means on the normalized values, see :mod:`kvq.calibration`).
The levels live in a codebook file (:mod:`kvq.codebooks`), referenced as ``source=FILE#NAME``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from kvq import codebooks, dtypes
from kvq.calibrated import Calibrated
from kvq.errors import KVQError, SpecError
from kvq.quantizers.codebook import CodebookQuantizer


class Nuq(Calibrated, CodebookQuantizer):
    """``nuq(bits, source=FILE#NAME)``: min-max normalized, calibrated levels in [-1, 1].

    ``scale="minmax"``: each granularity group is normalized by its own range; metadata
    ``scale`` and ``zero`` in the granularity's layout, stored at ``dtype`` (the stored values
    are the ones used). A group whose entries are all equal decodes exactly.
    ``scale="static"``: KVQuant's offline per-channel key scaling: one ``zero`` and ``scale`` per
    (kv head, channel), fitted by ``kvq calibrate`` and read from the codebook file
    (``NAME.zero``, ``NAME.scale``, (kv_heads, head_dim)); nothing is stored per block, the
    granularity is unused, and values beyond the calibrated range take the outer levels (put
    ``sparse`` first). Inputs are (batch, kv_heads * n, seq, head_dim) with n blocks per head
    folded head-major, as :class:`kvq.hf.KVQCache` quantizes them (n = 1 for plain K/V).
    Codes are the nearest level, the lower one on a tie (KVQuant's ``round_to_nearest_pole_sim``;
    the ``lloyd`` codebooks take the upper one, as vLLM does).
    There is no default codebook: a ``nuq`` step without ``source`` is an error.
    """

    type: Literal["nuq"] = "nuq"
    scale: Literal["minmax", "static"] = "minmax"
    source: str | None = None
    sha256: str | None = None

    positional = ("bits",)
    calibrated_by: ClassVar[str] = "kvq calibrate --recipe kvquant3"
    needs: ClassVar[str] = "a calibrated codebook"

    def load_tensors(self) -> None:
        lv = codebooks.checked_levels(self.artifact, self.ref, self.bits)
        if self.scale == "minmax" and not bool((lv.abs() <= 1).all()):
            raise SpecError(f"nuq levels {self.ref!r} in {self.where} reach "
                            f"{float(lv.abs().max()):.4g}, outside [-1, 1] where min-max "
                            "normalized values lie", suggestion="use the file `kvq calibrate` "
                            "wrote for this recipe, or scale=static if it was fitted for it")
        if self.scale == "static":
            codebooks.checked_static(self.artifact, self.ref)

    def fitted_heads(self) -> int | None:
        if self.scale == "static":
            return codebooks.checked_static(self.artifact, self.ref)[0].shape[0]
        return None

    def static(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(zero, scale), each fp32 (kv_heads, head_dim), of ``scale="static"`` (copies)."""
        zero, scale = self._static(device)
        return zero.clone(), scale.clone()

    def _static(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shared("zero", device), self.shared("scale", device)

    def spec_name(self):
        return "nuq"

    def codebook(self, head_dim):
        return codebooks.checked_levels(self.artifact, self.ref, self.bits).clone()

    def _levels(self, device) -> torch.Tensor:
        """The snapshot's levels on ``device`` (checked when the step was built; shared)."""
        return self.artifact.tensor(self.ref, device)

    def quantize(self, x, granularity):
        lv = self._levels(x.device)
        if self.scale == "static":
            zero, scale = self._per_head(x.shape, x.device)
            return nearest(x.sub_(zero).div_(scale), lv), {}
        v, scale, zero = minmax_normalize(x, granularity, self.dtype)
        return granularity.unview(nearest(v, lv), x.shape), {"scale": scale, "zero": zero}

    def _per_head(self, shape, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Static (zero, scale) broadcast to (1, kv_heads * n, 1, head_dim), head-major."""
        zero, scale = self._static(device)
        heads, d = zero.shape
        if shape[1] % heads or shape[-1] != d:
            raise KVQError(f"nuq static scales in {self.where} are for {heads} kv heads x "
                           f"head_dim {d}, but the K/V have shape {tuple(shape)}; use the "
                           "codebook file calibrated for this model")
        n = shape[1] // heads
        return tuple(t.repeat_interleave(n, 0)[None, :, None] for t in (zero, scale))

    def dequantize(self, codes, meta, granularity):
        if self.scale == "static":
            zero, scale = self._per_head(codes.shape, codes.device)
            lv = self._levels(codes.device)
            return lv[codes.long()].mul_(scale).add_(zero)
        g = granularity
        out = g.view(self._levels(codes.device)[codes.long()])
        out = out.mul_(g.from_meta(meta["scale"].float())).add_(g.from_meta(meta["zero"].float()))
        return g.unview(out, codes.shape)

    def meta_bits(self, groups):
        return 0 if self.scale == "static" else 2 * groups * dtypes.BITS[self.dtype]


def nearest(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """uint8 index of the level nearest to each entry of v, the lower one on a tie: KVQuant's
    ``round_to_nearest_pole_sim`` (argmin of ``|v - level|``, first index), computed the same
    way so that ties decided by fp32 rounding go the same way too."""
    out = torch.empty(v.shape, dtype=torch.uint8, device=v.device)
    for i in range(v.shape[0]):  # one batch row at a time bounds the (..., 2**bits) temp
        out[i] = (v[i].unsqueeze(-1) - levels).abs_().argmin(dim=-1).to(torch.uint8)
    return out


def minmax_normalize(x: torch.Tensor, granularity, dtype: dtypes.MetaDtype = "fp16"):
    """x (B, H, T, D) fp32 (overwritten) -> (v, scale, zero): v in [-1, 1] in the granularity's
    grouped view, ``scale = (max - min) / 2`` and ``zero = (max + min) / 2`` per group, stored
    at ``dtype`` in the metadata layout (v is computed from the stored values)."""
    g = granularity
    xg, dim = g.view(x), g.reduce_dim
    hi, lo = xg.amax(dim=dim, keepdim=True), xg.amin(dim=dim, keepdim=True)
    scale = dtypes.store(g.to_meta((hi - lo) / 2), dtype, "scale")
    zero = dtypes.store(g.to_meta((hi + lo) / 2), dtype, "zero point")
    s = g.from_meta(scale).float()
    v = xg.sub_(g.from_meta(zero).float()).div_(torch.where(s == 0, torch.ones_like(s), s))
    return v, scale, zero
