"""Quantize+dequantize throughput of the torch backend vs a plain tensor copy (same run).

    python benchmarks/bench_pipeline.py [--shape 1,8,4096,128] [--device cpu] [--repeats 10]

Prints, per pipeline, the median time of quantize, dequantize and both, in GB/s of fp16
input and as a ratio against ``x.clone()`` of the same tensor measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kvq

PIPELINES = ["ptok>int4", "nsep>pchan>int4", "nsep>pchan>int3", "group(32,token)>int2(asym)",
             "group(32)>int4(asym)", "rot>ptok>int4(asym)", "ptok>int8"]


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1,8,4096,128")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--backend", default="torch")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    x = torch.randn(shape, dtype=getattr(torch, args.dtype), device=args.device)
    gb = x.numel() * x.element_size() / 1e9
    copy = timed(lambda: x.clone(), args.repeats, args.device)
    print(f"shape {shape} {args.dtype} on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, backend {args.backend}")
    print(f"baseline x.clone(): {copy * 1e3:.2f} ms ({gb / copy:.1f} GB/s)\n")
    print(f"{'pipeline':<28} {'bits':>5} {'quant ms':>9} {'deq ms':>8} {'q+dq ms':>8} "
          f"{'GB/s':>6} {'copy/(q+dq)':>11}")
    for spec in PIPELINES:
        p = kvq.build(spec)
        q = p.quantize(x, backend=args.backend)
        tq = timed(lambda p=p: p.quantize(x, backend=args.backend), args.repeats, args.device)
        td = timed(lambda p=p, q=q: p.dequantize(q, backend=args.backend), args.repeats,
                   args.device)
        both = tq + td
        print(f"{spec:<28} {p.bits_per_element(shape[-1], shape[-2]):5.2f} {tq * 1e3:9.2f} "
              f"{td * 1e3:8.2f} {both * 1e3:8.2f} {gb / both:6.2f} {copy / both:11.4f}")


if __name__ == "__main__":
    main()
