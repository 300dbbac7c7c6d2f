"""Calibrate the transform-coding recipes, budgets and ablations (docs/transform-coding.md).

Captures K/V (pre- and post-RoPE keys, Fisher sensitivities) once on ``shakespeare:calib`` and
fits every variant from that capture, writing ``OUT/<label>.yaml`` + ``.safetensors``:

    python benchmarks/transform_coding.py --out results/tc [--tokens 8192]

then measure them with ``kvq compare --pipelines OUT/*.yaml --context 2048 --protocols
teacher-forced`` and ``python benchmarks/kvquant_calibrate.py --table DIR`` for the table.
Variants:

- ``tc{b}`` (b = 2, 3, 4): ``nsep>klt>alloc(b)`` for every layer, K and V; keys pre-RoPE, 1 sink,
  Fisher-weighted importance, k-means levels.
- ``tc-{B}`` (B = 2.48, 3.48, 4.48): ``--bits B``: alloc(2|3|4) per layer and K/V by knapsack
  (B leaves 0.02 bits/element for the sink token, which an fp32 model stores at 32 bits).
- ``tc{b}-unweighted`` (b = 2, 3): no Fisher weights (squared error in K/V units).
- ablations of ``tc-3.48``, one idea off each: ``-post`` keys after RoPE, ``-nosink``, ``-gauss``
  Gaussian Lloyd-Max levels instead of k-means, ``-nonsep`` no norm separation (``klt>alloc``),
  ``-unweighted`` no Fisher weights (squared error in K/V units).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kvq.eval.calibrate import CalibrationSettings, calibrate, capture_corpus

VARIANTS: dict[str, tuple[str, dict]] = {
    **{f"tc{b}": (f"tc{b}", {}) for b in (2, 3, 4)},
    **{f"tc-{b}.48": (f"tc{b}", {"bits": b + 0.48}) for b in (2, 3, 4)},
    **{f"tc{b}-unweighted": (f"tc{b}", {"sensitivity": "none"}) for b in (2, 3)},
    "tc-3.48-post": ("tc3", {"bits": 3.48, "key_rope": "post"}),
    "tc-3.48-nosink": ("tc3", {"bits": 3.48, "sinks": 0}),
    "tc-3.48-gauss": ("tc3", {"bits": 3.48, "levels": "gaussian"}),
    "tc-3.48-nonsep": ("tc3", {"bits": 3.48, "keys": "klt>alloc(3)", "values": "klt>alloc(3)"}),
    "tc-3.48-unweighted": ("tc3", {"bits": 3.48, "sensitivity": "none"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tc-calibrated")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", help="comma-separated labels, e.g. tc3,tc-3.48")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = CalibrationSettings(corpus="shakespeare:calib", tokens=args.tokens,  # the docs' tables
                               context=args.context, sensitivity="fisher")
    t0 = time.perf_counter()
    captured = capture_corpus(base, key_ropes=("post", "pre"))
    print(f"captured {args.tokens} tokens in {time.perf_counter() - t0:.0f} s", flush=True)
    for label, (recipe, change) in VARIANTS.items():
        if args.only and label not in args.only.split(","):
            continue
        if (out / f"{label}.yaml").exists():
            print(f"{label}: exists, kept", flush=True)
            continue
        t = time.perf_counter()
        s = CalibrationSettings(**{**vars(base), "recipe": recipe, **change})
        cfg = calibrate(s, out / f"{label}.yaml", progress=False, captured=captured)
        print(f"{label}: {cfg.label} in {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
