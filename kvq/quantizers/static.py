"""Static (calibrated) scales read from a file: the ``scale=static`` option of ``fp8`` / ``fp4``.

Serving engines quantize the FP8 / NVFP4 KV cache with scales fitted offline and shipped in the
checkpoint (vLLM's ``k_scale`` / ``v_scale``, per tensor or per attention head). ``kvq
calibrate --recipe fp8-tensor`` (and ``fp8-head``, ``nvfp4``) fits them
(:mod:`kvq.static_scales`) into a codebook file (:mod:`kvq.codebooks`); a step references them as
``source=FILE#NAME`` and reads the fp32 tensor ``NAME.scale``: shape () for one scale per
tensor, (kv_heads,) for one per KV head. The file is read once, when the step is built, and
pinned by its sha256 (:class:`kvq.calibrated.Calibrated`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvq.calibrated import Calibrated, check
from kvq.errors import SpecError


class StaticScaled(Calibrated):
    """Mixin of quantizers with ``scale: ... | "static"``, ``source`` and ``sha256`` fields: the
    file is read only with ``scale=static``."""

    calibrated_by: ClassVar[str] = "kvq calibrate --recipe fp8-tensor"
    needs: ClassVar[str] = "calibrated scales"

    def uses_source(self) -> bool:
        if self.scale == "static":
            return True
        if self.source is not None or self.sha256 is not None:
            name = self.spec_name()
            raise SpecError(f"{name}: source= is read only with scale=static",
                            suggestion=f"write {name}(...,scale=static,source=FILE#NAME)")
        return False

    def load_tensors(self) -> None:
        t = self.shared("scale")
        check(t.dim() <= 1 and t.numel() > 0 and bool((torch.isfinite(t) & (t > 0)).all()),
              self, f"{self.ref}.scale is not a finite positive scalar or (kv_heads,) tensor")

    def fitted_heads(self) -> int | None:
        t = self.shared("scale")
        return t.numel() if t.dim() == 1 else None

    def static_scale(self, device=None) -> torch.Tensor:
        """A copy of the fp32 scale: () per tensor or (kv_heads,) per KV head."""
        return self.tensor("scale", device)

    def broadcast_scale(self, shape, device) -> torch.Tensor:
        """The fp32 scale broadcast to x (B, kv_heads * n, T, D): (1, 1, 1, 1) per tensor or
        (1, kv_heads * n, 1, 1) per head, head-major."""
        s = self.shared("scale", device)
        if s.dim() == 0:
            return s.reshape(1, 1, 1, 1)
        return self.per_head(s, shape[1])[None, :, None, None]
