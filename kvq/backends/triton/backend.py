"""TritonBackend: fused Triton kernels for the common pipelines, same packed layout as torch.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before this package is
imported; slow, for tests). ``why_unsupported`` names the reason a pipeline or input cannot run;
``kvq.backends.resolve_backend`` turns it into the error of an explicit ``backend="triton"``.
"""

from __future__ import annotations

import torch

from kvq.backends.base import Backend
from kvq.backends.triton.codebook import dequantize_codebook, quantize_codebook
from kvq.backends.triton.common import is_interpreted
from kvq.backends.triton.plan import KernelPlan, Unsupported
from kvq.backends.triton.quantize_pack import _quantize_rows_kernel, quantize_pack
from kvq.backends.triton.unpack_dequantize import unpack_dequantize
from kvq.errors import NumericsError
from kvq.quantized import QuantizedTensor


class TritonBackend(Backend):
    """nsep / rot transforms, ptok / pchan / group(g, channel|token) (phead for the float
    formats), int2/3/4/8 sym/asym, llama.cpp's q4_0 / q4_1 / q8_0, fp8(e4m3|e5m2), fp4(mx|nv),
    lloyd codebooks (scaled, or unscaled after nsep / rot)."""

    name = "triton"

    @property
    def interpreted(self) -> bool:
        """True when the kernels run in the Triton interpreter (TRITON_INTERPRET=1)."""
        return is_interpreted(_quantize_rows_kernel)

    def why_unsupported(self, pipeline, x: torch.Tensor) -> str | None:
        """None when the kernels can run ``pipeline`` on ``x`` (input or packed codes), else why."""
        if pipeline.is_identity:
            return None  # nothing to compute: the tensor is stored as is
        if not x.is_cuda and not self.interpreted:
            return (f"the tensor is on {x.device.type}; the Triton kernels need a CUDA tensor (or "
                    "TRITON_INTERPRET=1 set before kvq.backends.triton is imported, for tests)")
        try:
            KernelPlan.from_pipeline(pipeline).check_input(x)
        except Unsupported as exc:
            return str(exc)
        return None

    def quantize(self, pipeline, x: torch.Tensor) -> QuantizedTensor:
        """x: (batch, kv_heads, seq, head_dim) -> QuantizedTensor (same layout as torch).

        NaN/Inf input is detected in the kernel (its max/min skip NaN, so unlike the reference's
        metadata, the stored scales need not show it) and raises NumericsError.
        """
        if pipeline.is_identity:
            return QuantizedTensor(x, {}, tuple(x.shape), x.dtype, 8 * x.element_size())
        plan = KernelPlan.from_pipeline(pipeline)
        run = quantize_codebook if plan.unscaled_codebook else quantize_pack
        with torch.cuda.device_of(x):  # launch on x's GPU (no-op on CPU)
            codes, meta, status = run(plan, x)
        if status & 1 and pipeline.check_finite:
            raise NumericsError("input holds NaN or Inf; kvq refuses to quantize non-finite K/V "
                                "(fix the model or build the pipeline with check_finite=False)")
        if status & 2:  # metadata the reference refuses (fp16 overflow, ...): it raises its error
            from kvq.backends.torch_backend import TorchBackend

            return TorchBackend().quantize(pipeline, x)
        return QuantizedTensor(codes, meta, tuple(x.shape), x.dtype, plan.bits)

    def dequantize(self, pipeline, q: QuantizedTensor) -> torch.Tensor:
        """QuantizedTensor -> (batch, kv_heads, seq, head_dim) in ``q.dtype``."""
        if pipeline.is_identity:
            return q.codes
        plan = KernelPlan.from_pipeline(pipeline)
        run = dequantize_codebook if plan.unscaled_codebook else unpack_dequantize
        with torch.cuda.device_of(q.codes):
            return run(plan, q.codes, q.meta, tuple(q.shape), q.dtype)
