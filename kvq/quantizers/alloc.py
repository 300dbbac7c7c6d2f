"""Per-channel bit allocation with calibrated levels: the quantizer of transform coding.

After a decorrelating transform (``klt``) the channels of a head have very different variances.
Spending the same bits on each wastes them; reverse water-filling spends them where the variance
is (channel c gets w_c bits, a high-variance one up to 8, a negligible one 0). ``alloc(b)``
codes channel c of kv head h as the nearest of its own ``2**w[h, c]`` levels (fitted offline:
k-means of that coordinate over calibration text), with ``sum_c w[h, c] = b * head_dim``, so
every token costs exactly b bits per element and nothing else is stored.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from kvq.calibrated import Calibrated, check
from kvq.quantizers.base import Quantizer

MAX_WIDTH = 8


class Alloc(Calibrated, Quantizer):
    """``alloc(bits, source=FILE#NAME)``: channel c of head h coded with ``w[h, c]`` bits.

    File tensors: ``NAME.alloc.widths`` (kv_heads, head_dim), integers in [0, 8] summing to
    ``bits * head_dim`` per head, and ``NAME.alloc.levels`` (kv_heads, head_dim, L), the first
    ``2**w`` entries of each row strictly increasing (the rest unused). A channel of width 0
    decodes to its one level. Values beyond the outer levels take them.

    Storage: the per-channel codes of a token are concatenated, channel by channel, least
    significant bit first, into one stream of ``bits * head_dim`` bits, which is cut into
    ``head_dim`` codes of ``bits`` bits: the pipeline's packing stores them as for ``int{bits}``.
    No metadata. Inputs (batch, kv_heads * n, seq, head_dim), n cache blocks folded head-major.
    """

    type: Literal["alloc"] = "alloc"
    bits: Literal[2, 3, 4, 8]
    source: str | None = None
    sha256: str | None = None

    positional = ("bits",)
    calibrated_by: ClassVar[str] = "kvq calibrate --recipe tc3"

    def fitted_heads(self) -> int:
        return self.shared("alloc.widths").shape[0]

    def load_tensors(self):
        widths, levels = self.shared("alloc.widths"), self.shared("alloc.levels")
        check(widths.dim() == 2 and levels.dim() == 3 and levels.shape[:2] == widths.shape, self,
              "alloc.widths / alloc.levels are not (kv_heads, head_dim) / (kv_heads, head_dim, L)")
        check(bool((widths == widths.round()).all()) and 0 <= float(widths.min())
              and float(widths.max()) <= MAX_WIDTH and levels.shape[2] >= 2 ** int(widths.max()),
              self, f"alloc.widths are not integers in [0, {MAX_WIDTH}] with levels for each")
        widths = widths.long()
        d = widths.shape[1]
        sums = widths.sum(dim=1)
        if not bool((sums == self.bits * d).all()):
            from kvq.errors import SpecError

            raise SpecError(f"alloc({self.bits}): the widths in {self.where} spend "
                            f"{int(sums[0])} bits per token of {d} channels, not "
                            f"{self.bits * d}", suggestion=f"write alloc({int(sums[0]) // d}) "
                            "or calibrate at this width")
        lv = _used(levels, widths)
        check(bool(torch.isfinite(lv).all()), self, "alloc.levels are not finite")
        check(bool((levels[..., 1:] > levels[..., :-1])[_steps(widths, levels.shape[2])].all()),
              self, "alloc.levels are not strictly increasing")

    def _params(self, x: torch.Tensor):
        widths = self.per_head(self.shared("alloc.widths", x.device), x.shape[1]).long()
        levels = self.per_head(self.shared("alloc.levels", x.device), x.shape[1])
        if x.shape[-1] != widths.shape[1]:
            from kvq.errors import KVQError

            raise KVQError(f"alloc in {self.where} was fitted for head_dim {widths.shape[1]}, "
                           f"the K/V have head_dim {x.shape[-1]}; use the file calibrated for "
                           "this model")
        return widths, levels

    def quantize(self, x, granularity):
        widths, levels = self._params(x)
        b, h, t, d = x.shape
        n = levels.shape[2]
        mids = (levels[..., 1:] + levels[..., :-1]) / 2
        mids = mids.masked_fill(~_steps(widths, n), float("inf"))  # (H, D, L - 1)
        xt = x.permute(1, 3, 0, 2).reshape(h, d, b * t).contiguous()
        codes = torch.searchsorted(mids, xt, right=True)  # (H, D, N) < 2**w
        codes = codes.reshape(h, d, b, t).permute(2, 0, 3, 1)  # (B, H, T, D)
        channel, bit = _stream(widths)  # (H, bits * D)
        stream = codes.gather(-1, channel[None, :, None].expand(b, h, t, -1))
        stream = (stream >> bit[None, :, None]) & 1
        weights = 1 << torch.arange(self.bits, device=x.device)
        out = (stream.reshape(b, h, t, d, self.bits) * weights).sum(-1)
        return out.to(torch.uint8), {}

    def dequantize(self, codes, meta, granularity):
        widths, levels = self._params(codes)
        b, h, t, d = codes.shape
        shifts = torch.arange(self.bits, device=codes.device)
        stream = ((codes.long()[..., None] >> shifts) & 1).reshape(b, h, t, d * self.bits)
        channel, bit = _stream(widths)
        index = channel[None, :, None].expand(b, h, t, -1)
        per_channel = torch.zeros(b, h, t, d, dtype=torch.long, device=codes.device)
        per_channel.scatter_add_(-1, index, stream << bit[None, :, None])
        n = levels.shape[2]
        row = torch.arange(h * d, device=codes.device).reshape(1, h, 1, d) * n
        return levels.reshape(-1)[per_channel + row]


def _stream(widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(channel, bit) of each position of a token's bit stream: each (H, sum_c w[h, c])."""
    h, d = widths.shape
    total = int(widths[0].sum())
    ends = widths.cumsum(1)  # (H, D)
    pos = torch.arange(total, device=widths.device).expand(h, -1)
    channel = torch.searchsorted(ends, pos.contiguous(), right=True)
    bit = pos - (ends - widths).gather(1, channel)
    return channel, bit


def _steps(widths: torch.Tensor, n: int) -> torch.Tensor:
    """(H, D, n - 1) bool: level j and j + 1 both used (j + 1 < 2**w)."""
    return torch.arange(1, n, device=widths.device) < (1 << widths)[..., None]


def _used(levels: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """The used levels of every channel, flattened."""
    return levels[torch.arange(levels.shape[2]) < (1 << widths.long())[..., None]]
