"""Triton split-K decode attention over packed K/V vs fp16 SDPA over a DynamicCache (GPU).

For each context length: a KVQLayer holds ``tokens`` K/V quantized with ``--spec`` (blocks of
``--block``, a 128-token exact window) and a DynamicCache layer holds the same K/V in fp16. One
decode step is timed for each, interleaved and repeated (CUDA events, median of ``--reps``):

- ``kvq triton``: :func:`kvq.hf.triton_decode.triton_decode_attention` (reads
  the packed codes, dequantizes in registers, split-K + reduce), after the layer's ``update``;
- ``sdpa fp16``: ``DynamicCache`` update (it concatenates the new token) + SDPA, and SDPA alone.

    python benchmarks/bench_triton_decode.py                      # GPU: 4k .. 128k tokens
    python benchmarks/bench_triton_decode.py --smoke              # CPU: interpreter, tiny sizes

Without CUDA the script sets TRITON_INTERPRET=1 and only makes sense with ``--smoke``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class _Config:
    _attn_implementation = "kvq"


def build(spec: str, b: int, h: int, t: int, d: int, block: int, dtype, device, seed=0):
    """(layer, view, window, dyn_keys, dyn_values): t tokens in both caches, one step away."""
    from transformers.cache_utils import DynamicLayer

    import kvq
    from kvq.hf.decode import FastDecode
    from kvq.hf.layer import KVQLayer

    g = torch.Generator(device=device).manual_seed(seed)
    p = kvq.build(spec)
    layer = KVQLayer(p, p, residual=128, block=block, prefill="exact")
    layer.fast = FastDecode(p, p, _Config())
    dyn = DynamicLayer()
    step = 16384  # write the prompt in slices (bounded fp temporaries when quantizing)
    for s in range(0, t, step):
        n = min(step, t - s)
        k = torch.randn(b, h, n, d, generator=g, device=device, dtype=dtype)
        v = torch.randn(b, h, n, d, generator=g, device=device, dtype=dtype)
        layer.update(k, v)
        dyn.update(k, v)
    k1 = torch.randn(b, h, 1, d, generator=g, device=device, dtype=dtype)
    kw, vw = layer.update(k1, k1)
    return layer, kw._kvq_view, (kw, vw), dyn, k1


def timed(fn, device, reps: int) -> list[float]:
    """Seconds per call, ``reps`` calls after one warm-up."""
    fn()
    out = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def measure(spec, b, h, hq, t, d, block, reps, dtype, device) -> dict:
    """One context length: median times (ms) of the three steps, interleaved."""
    from kvq.hf.flash_decode import decode_attention
    from kvq.hf.triton_decode import triton_decode_attention

    layer, view, window, dyn, k1 = build(spec, b, h, t, d, block, dtype, device)
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
    scale = d ** -0.5
    sdpa = torch.nn.functional.scaled_dot_product_attention
    full_k = torch.cat([dyn.keys, k1], dim=-2)
    full_v = torch.cat([dyn.values, k1], dim=-2)
    steps = {
        "triton": lambda: triton_decode_attention(q, view, window, None, scale),
        "sdpa_update": lambda: sdpa(q, torch.cat([dyn.keys, k1], dim=-2),
                                    torch.cat([dyn.values, k1], dim=-2), scale=scale,
                                    enable_gqa=True),
        "sdpa": lambda: sdpa(q, full_k, full_v, scale=scale, enable_gqa=True),
    }
    times = {k: [] for k in steps}
    for _ in range(reps):  # interleaved
        for name, fn in steps.items():
            times[name] += timed(fn, device, 1)
    diff = steps["triton"]().float() - decode_attention(q, view, window, None, scale).float()
    row = {f"{k}_ms": 1000 * statistics.median(v) for k, v in times.items()}
    row.update(tokens=t, max_diff=diff.abs().max().item(),
               ratio=row["triton_ms"] / row["sdpa_update_ms"])
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+",
                    default=[4096, 8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--spec", default="nsep>pchan>int4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes for a CPU check under TRITON_INTERPRET=1")
    ap.add_argument("--out", default="benchmarks/out/triton_decode.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tokens, args.kv_heads, args.q_heads, args.head_dim, args.reps = (
            [160, 300], 2, 4, 32, 2)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16
    b, h, hq, d = args.batch, args.kv_heads, args.q_heads, args.head_dim
    print(f"# {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (interpreter)'}, "
          f"{args.spec}, batch {b}, heads {hq}/{h}, head_dim {d}, block {args.block}, fp16")
    print("| tokens | kvq triton ms | sdpa fp16 ms (update + sdpa) | sdpa alone ms | "
          "triton / (update + sdpa) | max |diff| vs torch path |")
    print("|---|---|---|---|---|---|")
    rows = []
    for t in args.tokens:
        row = measure(args.spec, b, h, hq, t, d, args.block, args.reps, dtype, device)
        rows.append(row)
        print(f"| {t} | {row['triton_ms']:.3f} | {row['sdpa_update_ms']:.3f} | "
              f"{row['sdpa_ms']:.3f} | {row['ratio']:.2f}x | {row['max_diff']:.2e} |", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
