"""The torch reference backend: readable, runs anywhere, the oracle for every kernel."""

from __future__ import annotations

import torch

from kvq.backends.base import Backend
from kvq.quantized import QuantizedTensor
from kvq.quantizers.packing import pack, unpack


class TorchBackend(Backend):
    """Steps run one after another in fp32; codes bit-packed with :mod:`kvq.quantizers.packing`."""

    name = "torch"

    def quantize(self, pipeline, x):
        if pipeline.is_identity:
            return QuantizedTensor(x, {}, tuple(x.shape), x.dtype, 8 * x.element_size())
        h, meta = x.to(torch.float32, copy=True), {}  # steps may work in place on h
        for t in pipeline.transforms:
            h, m = t.forward(h)
            meta.update(m)
        codes, m = pipeline.quantizer.quantize(h, pipeline.granularity)
        meta.update(m)
        packed = pack(codes, pipeline.bits)
        return QuantizedTensor(packed, meta, tuple(x.shape), x.dtype, pipeline.bits)

    def dequantize(self, pipeline, q):
        if pipeline.is_identity:
            return q.codes
        codes = unpack(q.codes, pipeline.bits, q.shape[-1])
        h = pipeline.quantizer.dequantize(codes, q.meta, pipeline.granularity)
        for t in reversed(pipeline.transforms):
            h = t.inverse(h, q.meta)
        return h.to(q.dtype)
