"""Compile the Triton kernels for a GPU target on a machine without a GPU.

    python -m kvq.backends.triton.compile_check            # sm_90, the default pipelines
    python -m kvq.backends.triton.compile_check --arch 80 "rot>ptok>int4(asym)"

The interpreter (TRITON_INTERPRET=1) accepts code the GPU compiler rejects (e.g. non-constexpr
globals), so CPU-only CI compiles the kernels too: the real launchers run on small CPU tensors
while ``compile_only`` turns every launch into ``triton.compile`` for the target (with the
ptxas shipped in the triton wheel). Needs TRITON_INTERPRET unset when this module is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvq.backends.triton import common

# rows kernel, token kernel in one pass and streamed (group of 24 tokens), rotation, all widths
PIPELINES = ("nsep>pchan>int4", "group(32)>int3(asym)", "rot>nsep>ptok>int2",
             "group(24,token)>int8(asym)", "nsep>rot>lloyd3(none)")
# bfloat16 input and metadata, a padded head_dim, a random rotation with nsep before it
EXTRA = (("nsep(bf16)>rot>group(16,token)>int4(asym,dtype=bf16)", 80, torch.bfloat16),
         ("rot>q4_0", 64, torch.float16), ("q4_1", 96, torch.bfloat16),
         ("q8_0", 128, torch.float32),  # llama.cpp's block formats
         # float formats and scaled codebooks (float_formats.py), phead, nv's head statistics
         ("phead>fp8", 128, torch.float16), ("fp8(e4m3,none)", 64, torch.float32),
         ("group(16,token)>fp8(e5m2,dtype=bf16)", 80, torch.bfloat16),
         ("nsep>rot>group(16)>fp4(nv)", 64, torch.float32),
         ("group(32,token)>fp4(mx)", 128, torch.float16), ("pchan>lloyd3", 96, torch.float16))
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
        torch.uint8: "*u8", torch.int32: "*i32"}
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


def _compile(target: GPUTarget, log: list[str], kernel, args, kwargs) -> None:
    """triton.compile ``kernel`` for the arguments of one launch; append a line to log."""
    values = dict(zip([p.name for p in kernel.params], args))
    values.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
    values.update({p.name: p.default for p in kernel.params
                   if p.name not in values and p.has_default})
    sig, constexprs = {}, {}
    for p in kernel.params:
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], constexprs[p.name] = "constexpr", v
        else:
            sig[p.name] = (_PTR[v.dtype] if isinstance(v, torch.Tensor)
                           else "fp32" if isinstance(v, float) else "i32")
    options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
    t0 = time.perf_counter()
    triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs), target=target,
                   options=options)
    log.append(f"{kernel.__name__} {constexprs} {time.perf_counter() - t0:.1f}s")


@contextlib.contextmanager
def compile_only(arch: int = 90, log: list[str] | None = None):
    """Within the block, kernel launches compile for CUDA sm_<arch> instead of running."""
    from kvq.backends.triton import quantize_pack

    target = GPUTarget("cuda", arch, 32)
    log = [] if log is None else log
    common._launch_hook = lambda kernel, args, kwargs: _compile(target, log, kernel, args, kwargs)
    on_cpu = quantize_pack.torch_divides_by_reciprocal
    quantize_pack.torch_divides_by_reciprocal = lambda x: True  # the CUDA variant, as on a GPU
    try:
        yield log
    finally:
        common._launch_hook = None
        quantize_pack.torch_divides_by_reciprocal = on_cpu


def check(pipelines=PIPELINES, head_dim: int = 128, seq: int = 64, arch: int = 90,
          extra=EXTRA) -> list[str]:
    """Compile quantize and dequantize of each pipeline (fp16 input at head_dim) and of each
    (spec, head_dim, dtype) in extra; returns one line per compiled kernel."""
    import kvq
    from kvq.backends.triton.codebook import dequantize_codebook, quantize_codebook
    from kvq.backends.triton.plan import KernelPlan
    from kvq.backends.triton.quantize_pack import quantize_pack
    from kvq.backends.triton.unpack_dequantize import unpack_dequantize

    if common.is_interpreted(common.round_half_even):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    cases = [(spec, head_dim, torch.float16) for spec in pipelines] + list(extra)
    with compile_only(arch) as log:
        for spec, d, dtype in cases:
            x = torch.randn(1, 1, seq, d, dtype=dtype)
            plan = KernelPlan.from_pipeline(kvq.build(spec))
            quantize = quantize_codebook if plan.unscaled_codebook else quantize_pack
            dequantize = dequantize_codebook if plan.unscaled_codebook else unpack_dequantize
            codes, meta, _ = quantize(plan, x)
            dequantize(plan, codes, meta, tuple(x.shape), x.dtype)
    return log


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipelines", nargs="*", default=list(PIPELINES))
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    extra = EXTRA if args.pipelines == list(PIPELINES) else ()
    for line in check(args.pipelines, args.head_dim, arch=args.arch, extra=extra):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
