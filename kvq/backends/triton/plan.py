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

Granularity = Literal["ptok", "pchan", "group_channel", "group_token", "phead"]

MAX_HEAD_DIM = 512
FORMATS = ("q4_0", "q4_1", "q8_0")  # llama.cpp block formats (kernels: ggml_blocks.py)
# the kernels' FMT constexpr: kvq's int, llama.cpp's blocks, then float_formats.py's formats
FMT_CODES = ("int", *FORMATS, "e4m3", "e5m2", "lloyd", "mx", "nv")
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
    fmt: "int" (kvq's int quantizer); a llama.cpp block format on group(32, channel): "q4_0",
    "q4_1" (asym: its block minimum is stored as the zero) or "q8_0"; "e4m3" / "e5m2" (fp8),
    "mx" / "nv" (fp4 block scaling, scale codes uint8) or "lloyd" (a codebook quantizer).
    scaled: False for ``fp8(none)`` and ``lloyd(none)`` (no scale, gran unused).
    codebook: for a codebook quantizer, its ``levels(head_dim, device)``; codes are level
    indices. Unscaled ones run in codebook.py's kernels, scaled ones in the generic kernels.
    top: the absmax a scaled fp8 / lloyd group maps onto (fmax, max|level|), else 0.
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
    scaled: bool = True
    top: float = 0.0

    @classmethod
    def from_pipeline(cls, pipeline) -> KernelPlan:
        """The plan of a :class:`kvq.Pipeline`; raises Unsupported naming the step it can't run.

        Runs: at most one ``nsep`` and one ``rot`` (either order), then ``ptok``, ``pchan``,
        ``group(g, channel)`` or ``group(g, token)`` (or ``phead``, for the float formats and
        codebooks), then ``int2/3/4/8`` (sym or asym), ``q4_0`` / ``q4_1`` / ``q8_0``,
        ``fp8(e4m3|e5m2)``, ``fp4(mx|nv)`` or a codebook (``lloyd{b}``, scaled or not).
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
        common = dict(nsep=nsep_pos, renorm=nsep.renorm if nsep else True,
                      rot=rot.matrix if rot else None,
                      norm_dtype=TORCH_DTYPES[nsep.dtype] if nsep else torch.float16)
        # codebooks that keep the base class's encoding (lloyd, plugins; not nuq's minmax)
        book = (isinstance(quant, CodebookQuantizer) and quant.scale in ("none", "absmax")
                and type(quant).quantize is CodebookQuantizer.quantize
                and type(quant).dequantize is CodebookQuantizer.dequantize)
        if book and quant.scale == "none":
            return cls(bits=quant.bits, fmt="lloyd", codebook=quant.levels, scaled=False,
                       **common)
        if quant.type in ("fp8", "fp4") and quant.scale == "static":
            raise Unsupported(f"quantizer {quant.to_spec()[:60]!r}: calibrated static scales "
                              "have no kernel (the torch backend runs them)")
        if book:
            fmt = "lloyd"
        elif quant.type == "int" and quant.rounding != "even":
            raise Unsupported(f"quantizer {quant.to_spec()!r}: the kernels round half to even "
                              "with the stored scale (rounding=vllm runs on torch)")
        elif quant.type in ("int", *FORMATS):
            fmt = quant.type
        elif quant.type == "fp8":
            fmt = quant.format
        elif quant.type == "fp4":
            fmt = quant.block
        else:
            raise Unsupported(f"quantizer {quant.to_spec()!r} has no kernel (int2/3/4/8, "
                              f"{', '.join(FORMATS)}, fp8, fp4 and lloyd codebooks only)")
        gran = pipeline.granularity
        if gran.type == "group":
            kind, group = ("group_channel" if gran.axis == "channel" else "group_token"), gran.size
        elif gran.type in ("ptok", "pchan") or (gran.type == "phead" and fmt not in
                                                 ("int", *FORMATS)):
            kind, group = gran.type, 0
        else:  # phead x int: the decode-attention kernel reads int plans and has no phead index
            raise Unsupported(f"granularity {gran.to_spec()!r} has no kernel for "
                              f"{quant.to_spec()!r}")
        if fmt == "lloyd":
            return cls(bits=quant.bits, fmt=fmt, gran=kind, group=group, codebook=quant.levels,
                       meta_dtype=TORCH_DTYPES[quant.dtype], **common)
        if quant.type == "fp8":
            if quant.overflow != "raise":
                raise Unsupported(f"quantizer {quant.to_spec()!r}: the kernels have no "
                                  "saturating fp8 cast (it runs on torch)")
            if quant.scale == "none":  # no statistics: the granularity is unused
                kind, group = "ptok", 0
            return cls(bits=8, fmt=fmt, gran=kind, group=group, scaled=quant.scale != "none",
                       top=quant.fmax, meta_dtype=TORCH_DTYPES[quant.dtype], **common)
        if quant.type == "fp4":
            return cls(bits=4, fmt=fmt, gran=kind, group=group, meta_dtype=torch.uint8, **common)
        ggml = quant.type in FORMATS
        return cls(bits=quant.bits, asym=quant.type == "q4_1" if ggml else quant.scheme == "asym",
                   fmt=quant.type, gran=kind, group=group,
                   meta_dtype=torch.float16 if ggml else TORCH_DTYPES[quant.dtype], **common)

    def levels(self, d: int, device: torch.device) -> torch.Tensor:
        """The codebook's sorted levels for head_dim d: (2**bits,) float32 on device."""
        return self.codebook(d, torch.device(device)).float().contiguous()

    def rotation(self, d: int, device: torch.device) -> torch.Tensor:
        """R (d, d) float32 on device, cached per (rotation step, head_dim, device)."""
        return _rotation(self.rot, d, torch.device(device))

    @property
    def fmt_code(self) -> int:
        """The kernels' FMT constexpr: 0 int, 1 q4_0, 2 q4_1, 3 q8_0 (ggml_blocks.py), 4 e4m3,
        5 e5m2, 6 lloyd, 7 mx, 8 nv (float_formats.py)."""
        return FMT_CODES.index(self.fmt)

    @property
    def unscaled_codebook(self) -> bool:
        """Runs in codebook.py's kernels (``lloyd{b}(none)``), not the generic ones."""
        return self.codebook is not None and not self.scaled

    @property
    def head_stats(self) -> bool:
        """Needs each (batch, head)'s absmax before quantizing (phead scales, nv's tensor scale)."""
        return self.scaled and (self.gran == "phead" or self.fmt == "nv")

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
