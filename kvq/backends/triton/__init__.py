"""Triton backend: fused quantize+pack and unpack+dequantize kernels (docs/triton.md).

Importing this package imports nothing; ``kvq.backends.triton.backend`` imports triton and is
registered lazily as the ``triton`` backend.
"""
