"""QuantizedTensor: what a pipeline stores for one K or V tensor."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class QuantizedTensor:
    """Bit-packed codes plus metadata for a (batch, kv_heads, seq, head_dim) tensor.

    codes: uint8 (batch, kv_heads, seq, ceil(head_dim / 8) * bits), see
        :mod:`kvq.quantizers.packing`; for the ``none`` quantizer, the tensor itself.
    meta: named metadata tensors at their storage dtype, e.g. ``norm`` (B, H, T, 1),
        ``scale`` / ``zero`` in the granularity's layout.
    spec: the steps of the pipeline that produced it (set by ``Pipeline.quantize``); dequantizing
        with another pipeline is refused. Empty: not recorded, not checked.
    """

    codes: torch.Tensor
    meta: dict[str, torch.Tensor] = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float16
    bits: int = 16
    spec: str = ""

    @property
    def nbytes(self) -> int:
        """Bytes really held: packed codes and every metadata tensor."""
        tensors = [self.codes, *self.meta.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def seq_len(self) -> int:
        return self.shape[-2]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device) -> QuantizedTensor:
        meta = {k: v.to(device) for k, v in self.meta.items()}
        return QuantizedTensor(self.codes.to(device), meta, self.shape, self.dtype, self.bits,
                               self.spec)

    def __repr__(self) -> str:
        metas = ", ".join(f"{k}{tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}"
                          for k, v in self.meta.items())
        return (f"QuantizedTensor(shape={self.shape}, bits={self.bits}, nbytes={self.nbytes}, "
                f"codes{tuple(self.codes.shape)}, {metas})")
