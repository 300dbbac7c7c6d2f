"""KernelPlan: the flat description of a pipeline that the Triton kernels execute.

A plan holds only what the kernels need (constexpr switches, dtypes, the rotation matrix), so the
kernels never look at pipeline step models. `KernelPlan.from_pipeline` builds one or raises
`Unsupported` with the reason, which `TritonBackend.why_unsupported` reports.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from kvq.dtypes import TORCH_DTYPES

Granularity = Literal["ptok", "pchan", "group_channel", "group_token"]

MAX_HEAD_DIM = 512
FORMATS = ("q4_0", "q4_1", "q8_0")  # llama.cpp block formats (kernels: ggml_blocks.py)
TOKEN_AXIS = ("pchan", "group_token")


class Unsupported(Exception):
    """The pipeline (or input) cannot run on the Triton kernels; the message says why."""


@dataclass(frozen=True)
class KernelPlan:
    """One quantize/dequantize pipeline, flattened for the kernels.

    nsep: 0 = no norm separation, 1 = before the rotation (or no rotation), 2 = after the rotation.
    rot: None, or a function head_dim -> (D, D) float32 orthonormal R (the reference's own matrix).
    gran / group: granularity; group is g for group(g, channel|token), else 0.
    bits / asym: integer quantizer. meta_dtype: scale and zero dtype; norm_dtype: nsep norm dtype.
    fmt: "int" (kvq's int quantizer) or a llama.cpp block format on group(32, channel): "q4_0",
    "q4_1" (asym: its block minimum is stored as the zero) or "q8_0".
    codebook: for an unscaled codebook quantizer (``lloyd4(none)``), its ``levels(head_dim,
    device)``; codes are then level indices and there is no scale (gran is unused).
    """

    bits: int
    asym: bool = False
    fmt: str = "int"
    gran: Granularity = "ptok"
    group: int = 0
    nsep: int = 0
    renorm: bool = True
    rot: Callable[[int], torch.Tensor] | None = None
    meta_dtype: torch.dtype = torch.float16
    norm_dtype: torch.dtype = torch.float16
    codebook: Callable[[int, torch.device], torch.Tensor] | None = None

    @classmethod
    def from_pipeline(cls, pipeline) -> KernelPlan:
        """The plan of a :class:`kvq.Pipeline`; raises Unsupported naming the step it can't run.

        Runs: at most one ``nsep`` and one ``rot`` (either order), then ``ptok``, ``pchan``,
        ``group(g, channel)`` or ``group(g, token)``, then ``int2/3/4/8`` (sym or asym); or the
        transforms, then an unscaled codebook quantizer (``lloyd{b}(none)``).
        """
        from kvq.quantizers.codebook import CodebookQuantizer

        names = [t.type for t in pipeline.transforms]
        if any(n not in ("nsep", "rot") for n in names) or len(set(names)) != len(names):
            raise Unsupported(f"transforms {'>'.join(names)}: the kernels run at most one nsep "
                              "and one rot (in either order)")
        quant = pipeline.quantizer
        nsep = next((t for t in pipeline.transforms if t.type == "nsep"), None)
        rot = next((t for t in pipeline.transforms if t.type == "rot"), None)
        nsep_pos = 0 if nsep is None else (2 if names == ["rot", "nsep"] else 1)
        if isinstance(quant, CodebookQuantizer):
            if quant.scale != "none":
                raise Unsupported(f"quantizer {quant.to_spec()!r} has no kernel (codebooks run "
                                  "only unscaled, scale=none)")
            return cls(bits=quant.bits, nsep=nsep_pos, renorm=nsep.renorm if nsep else True,
                       rot=rot.matrix if rot else None, codebook=quant.levels,
                       norm_dtype=TORCH_DTYPES[nsep.dtype] if nsep else torch.float16)
        if quant.type not in ("int", *FORMATS):
            raise Unsupported(f"quantizer {quant.to_spec()!r} has no kernel (int2/3/4/8, "
                              f"{', '.join(FORMATS)} and unscaled codebooks only)")
        gran = pipeline.granularity
        if gran.type == "group":
            kind, group = ("group_channel" if gran.axis == "channel" else "group_token"), gran.size
        elif gran.type in ("ptok", "pchan"):
            kind, group = gran.type, 0
        else:
            raise Unsupported(f"granularity {gran.to_spec()!r} has no kernel")
        ggml = quant.type in FORMATS
        return cls(bits=quant.bits, asym=quant.type == "q4_1" if ggml else quant.scheme == "asym",
                   fmt=quant.type, gran=kind, group=group, nsep=nsep_pos,
                   renorm=nsep.renorm if nsep else True, rot=rot.matrix if rot else None,
                   meta_dtype=torch.float16 if ggml else TORCH_DTYPES[quant.dtype],
                   norm_dtype=TORCH_DTYPES[nsep.dtype] if nsep else torch.float16)

    def levels(self, d: int, device: torch.device) -> torch.Tensor:
        """The codebook's sorted levels for head_dim d: (2**bits,) float32 on device."""
        return self.codebook(d, torch.device(device)).float().contiguous()

    def rotation(self, d: int, device: torch.device) -> torch.Tensor:
        """R (d, d) float32 on device, cached per (rotation step, head_dim, device)."""
        return _rotation(self.rot, d, torch.device(device))

    @property
    def fmt_code(self) -> int:
        """The kernels' FMT constexpr: 0 for int, 1 q4_0, 2 q4_1, 3 q8_0 (ggml_blocks.py)."""
        return FORMATS.index(self.fmt) + 1 if self.fmt in FORMATS else 0

    @property
    def offset(self) -> int:
        """Symmetric codes dequantize as (code - offset) * scale: qmax, 8 (q4_0), 128 (q8_0)."""
        if self.asym:
            return 0
        return {"q4_0": 8, "q8_0": 128}.get(self.fmt, (1 << (self.bits - 1)) - 1)

    @property
    def token_axis(self) -> bool:
        """Scales are statistics over tokens (pchan, group(g, token))."""
        return self.gran in TOKEN_AXIS

    def check_input(self, x: torch.Tensor) -> None:
        """Raise Unsupported when the kernels cannot take x (B, H, T, D) or its packed codes."""
        if x.dtype == torch.uint8:  # dequantize: codes (B, H, T, RB); any group size works
            if x.dim() != 4 or x.shape[-1] * 8 // self.bits > MAX_HEAD_DIM:
                raise Unsupported(f"packed codes of shape {tuple(x.shape)} do not fit the kernels")
            return
        if x.dim() != 4:
            raise Unsupported(f"expects (batch, kv_heads, seq, head_dim), got {tuple(x.shape)}")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise Unsupported(f"dtype {x.dtype} is not float16/bfloat16/float32")
        d = x.shape[-1]
        if d > MAX_HEAD_DIM:
            raise Unsupported(f"head_dim {d} > {MAX_HEAD_DIM} (one row must fit in a tile)")
        if self.gran == "group_channel":
            g = self.group
            if g & (g - 1) or g > d or d % g:
                raise Unsupported(f"group({g}, channel) needs a power-of-two group dividing "
                                  f"head_dim {d}")


@functools.lru_cache(maxsize=32)
def _rotation(matrix: Callable[[int], torch.Tensor], d: int, device: torch.device) -> torch.Tensor:
    return matrix(d).to(device=device, dtype=torch.float32).contiguous()
