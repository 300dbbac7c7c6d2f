"""The backend interface."""

from __future__ import annotations

import torch

from kvq.quantized import QuantizedTensor


class Backend:
    """Runs a :class:`kvq.Pipeline`. Every backend writes the same packed layout."""

    name = "base"

    def why_unsupported(self, pipeline, x: torch.Tensor) -> str | None:
        """Why this backend cannot run ``pipeline`` on ``x`` (None when it can)."""
        return None

    def supports(self, pipeline, x: torch.Tensor) -> bool:
        return self.why_unsupported(pipeline, x) is None

    def quantize(self, pipeline, x: torch.Tensor) -> QuantizedTensor:
        """x: (batch, kv_heads, seq, head_dim), already checked by ``pipeline.check_input``."""
        raise NotImplementedError

    def dequantize(self, pipeline, q: QuantizedTensor) -> torch.Tensor:
        raise NotImplementedError
