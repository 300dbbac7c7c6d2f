"""Triton quantize+pack and unpack+dequantize throughput vs a device-to-device copy and vs torch.

    python benchmarks/bench_triton.py                       # CUDA: (8, 32, 4096, 128) fp16
    python benchmarks/bench_triton.py --shape 1,8,4096,128 --pipelines "nsep>pchan>int4;ptok>int8"
    TRITON_INTERPRET=1 python benchmarks/bench_triton.py    # CPU interpreter: correctness only

Per pipeline it prints the time of the Triton backend's quantize (transforms + quantize + pack)
and dequantize (unpack + dequantize + inverse transforms), their effective bandwidth (bytes read
plus bytes written: the fp16 input and the packed codes with metadata) as a fraction of the
bandwidth of ``y.copy_(x)`` measured in the same run, the speed-up over the torch backend on the
same device, and whether the codes equal the torch reference's. Under the interpreter the
figures only show that it runs: it is a numpy emulation, not a performance measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

PIPELINES = ["ptok>int4", "nsep>pchan>int4", "nsep>pchan>int3", "nsep>pchan>int2",
             "group(32,token)>int4(asym)", "group(32)>int4(asym)", "rot>ptok>int4(asym)",
             "ptok>int8", "phead>fp8", "group(32)>fp4(mx)", "group(16)>fp4(nv)", "ptok>lloyd4"]


def _timer(device: str, repeats: int):
    """ms of fn(): triton.testing.do_bench on CUDA (median, L2 flushed), wall clock otherwise."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=max(repeats, 100), return_mode="median")

    def wall(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    return wall


def _triton_version() -> str:
    import triton

    return triton.__version__


def _measure(bench, backend, p, x, q) -> tuple[float, float]:
    """(quantize ms, dequantize ms) of one backend."""
    return bench(lambda: backend.quantize(p, x)), bench(lambda: backend.dequantize(p, q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default=None, help="B,H,T,D (CUDA default 8,32,4096,128; "
                    "interpreter default 1,2,256,128)")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--pipelines", default=";".join(PIPELINES), help="';'-separated specs")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("0", "")
    if not torch.cuda.is_available() and not interpreted:
        print("bench_triton: no CUDA device, nothing to measure. The Triton kernels need a GPU; "
              "set TRITON_INTERPRET=1 to run them in the (slow, correctness-only) interpreter.")
        return 0
    import kvq
    from kvq.backends import get_backend

    device = "cpu" if interpreted else "cuda"
    shape = tuple(int(s) for s in (args.shape or ("1,2,256,128" if interpreted
                                                  else "8,32,4096,128")).split(","))
    x = torch.randn(shape, dtype=getattr(torch, args.dtype), device=device)
    y = torch.empty_like(x)
    bench = _timer(device, args.repeats)
    triton, ref = get_backend("triton"), get_backend("torch")
    if interpreted:
        print(f"shape {shape} {args.dtype} in the Triton interpreter on CPU: a numpy emulation, "
              "so only times and parity are shown, no bandwidth figures\n")
        print(f"{'pipeline':<28} {'quant ms':>9} {'deq ms':>8}  codes = torch")
    else:
        y = torch.empty_like(x)
        t_copy = bench(lambda: y.copy_(x))
        copy_gbs = 2 * x.nbytes / t_copy / 1e6
        print(f"shape {shape} {args.dtype} on {torch.cuda.get_device_name()}; "
              f"torch {torch.__version__}, triton {_triton_version()}")
        print(f"baseline y.copy_(x): {t_copy:.3f} ms, {copy_gbs:.1f} GB/s (read + write)\n")
        print(f"{'pipeline':<28} {'quant ms':>9} {'q %copy':>8} {'q vs torch':>10} "
              f"{'deq ms':>8} {'dq %copy':>8} {'dq vs torch':>11}  codes = torch")
    for spec in [s.strip() for s in args.pipelines.split(";") if s.strip()]:
        p = kvq.build(spec)
        reason = triton.why_unsupported(p, x)
        if reason:
            print(f"{spec:<28} skipped: {reason}")
            continue
        q, qr = triton.quantize(p, x), ref.quantize(p, x)
        moved = int((q.codes != qr.codes).sum())
        same = "yes" if moved == 0 else f"no ({moved} bytes differ)"
        t_q, t_d = _measure(bench, triton, p, x, q)
        if interpreted:
            print(f"{spec:<28} {t_q:9.1f} {t_d:8.1f}  {same}")
            continue
        t_qr, t_dr = _measure(bench, ref, p, x, qr)
        mbytes = (x.nbytes + q.nbytes) / 1e6  # each op reads one side and writes the other
        frac_q, frac_d = mbytes / t_q / copy_gbs, mbytes / t_d / copy_gbs
        print(f"{spec:<28} {t_q:9.3f} {100 * frac_q:7.3g}% {t_qr / t_q:9.3g}x {t_d:8.3f} "
              f"{100 * frac_d:7.3g}% {t_dr / t_d:10.3g}x  {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
