"""Calibrate the kvquant recipes and their ablations on SmolLM2 for docs/kvquant.md.

Captures K/V (pre- and post-RoPE keys, Fisher sensitivities) once on ``shakespeare:calib`` and
fits every variant from that capture, writing ``OUT/<label>.yaml`` + ``.safetensors``:

    python benchmarks/kvquant_calibrate.py --out results/kvquant [--tokens 4096] [--bits 2,3,4]

then measure them with ``kvq compare --pipelines OUT/*.yaml ... --protocols teacher-forced``.
Variants per bit width b (each switches one idea off):

- ``kvq{b}``: the full recipe (kvquant{b}: pre-RoPE keys with static per-channel scales, 1%
  sparse outliers, Fisher-weighted k-means levels, 1 sink)
- ``kvq{b}-post``: keys after RoPE;  ``kvq{b}-dense``: no sparse outliers;
  ``kvq{b}-uniform``: evenly spaced levels;  ``kvq{b}-nosink``: no sink;
  ``kvq{b}-dynamic``: per-block key scales (pchan) instead of static ones;
  ``kvq{b}-unweighted``: k-means without the Fisher weights;  ``kvq{b}-vdense``: no sparse
  outliers for values only (keys keep theirs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kvq.eval.calibrate import CalibrationSettings, calibrate, capture_corpus
from kvq.presets import RECIPES


def variants(b: int) -> dict[str, dict]:
    r = RECIPES[f"kvquant{b}"]
    dense_k = r["keys"].replace("sparse(0.01,channel)>", "")
    dense_v = r["values"].replace("sparse(0.01)>", "")
    return {
        f"kvq{b}": {},
        f"kvq{b}-post": {"key_rope": "post"},
        f"kvq{b}-dense": {"keys": dense_k, "values": dense_v},
        f"kvq{b}-uniform": {"levels": "uniform"},
        f"kvq{b}-nosink": {"sinks": 0},
        f"kvq{b}-dynamic": {"keys": f"sparse(0.01,channel)>pchan>nuq({b})"},
        f"kvq{b}-unweighted": {"sensitivity": "none"},
        f"kvq{b}-vdense": {"values": dense_v},
    }


def table(dirs: list[str]) -> str:
    """Markdown ablation table from ``kvq compare`` output directories (results.json)."""
    import json

    rows, base = {}, None
    for d in dirs:
        for r in json.loads((Path(d) / "results.json").read_text())["rows"]:
            if r["pipeline"] == "fp16":
                base = r["value"]
            rows.setdefault(r["pipeline"], r)
    out = [f"fp16 PPL {base:.3f}", "", "| pipeline | bits/elt | PPL | ΔPPL | ΔPPL % |",
           "|:---|---:|---:|---:|---:|"]
    for label, r in rows.items():
        if label != "fp16":
            out.append(f"| {label} | {r['bits_per_element']:.3f} | {r['value']:.3f} | "
                       f"{r['value'] - base:+.3f} | {100 * (r['value'] / base - 1):+.1f}% |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="kvquant-calibrated")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", help="comma-separated variant suffixes, e.g. vdense,post")
    ap.add_argument("--table", nargs="+", metavar="DIR",
                    help="only print the ablation table of these kvq compare --out dirs")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = CalibrationSettings(corpus="shakespeare:calib", tokens=args.tokens,  # the docs' tables
                               context=args.context)
    t0 = time.perf_counter()
    captured = capture_corpus(base, key_ropes=("post", "pre"))
    print(f"captured {args.tokens} tokens in {time.perf_counter() - t0:.0f} s", flush=True)
    for b in (int(x) for x in args.bits.split(",")):
        for label, change in variants(b).items():
            suffix = label.partition("-")[2] or "full"
            if args.only and suffix not in args.only.split(","):
                continue
            if (out / f"{label}.yaml").exists():
                print(f"{label}: exists, kept", flush=True)
                continue
            t = time.perf_counter()
            s = CalibrationSettings(**{**vars(base), "recipe": f"kvquant{b}", **change})
            recipe = {**RECIPES[s.recipe], **{k: v for k, v in change.items()
                                              if k in ("keys", "values")}}
            s.keys, s.values = recipe["keys"], recipe["values"]
            cfg = calibrate(s, out / f"{label}.yaml", progress=False, captured=captured)
            print(f"{label}: {cfg.label} in {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
