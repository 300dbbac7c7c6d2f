"""``kvq calibrate``: fit a recipe's nuq codebooks on calibration text -> YAML + safetensors."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  kvq calibrate --recipe kvquant3 --out calibrated/kvquant3.yaml
  kvq compare --pipelines kvquant3,calibrated/kvquant3.yaml --protocols teacher-forced
  kvq calibrate --keys 'pchan>nuq(3)' --values 'ptok>nuq(2)' --out my.yaml --sensitivity none
  kvq calibrate --recipe kvquant2 --model PATH --corpus my_texts/ --tokens 16384

Writes OUT (a KVConfig with one override per layer) and OUT with suffix .safetensors (the
levels it references; keep the two files together). The default corpus is mixed:calib, the calib
splits of the shipped Shakespeare, prose and code corpora in equal shares (fits that transfer
across domains); evaluation splits are refused. Recipes: kvquant2, kvquant3,
kvquant4 (kvq explain kvquant3 shows the uncalibrated preset), tc2/3/4, and static KV scales
for serving engines (kvq export): fp8-tensor, fp8-head (as llm-compressor), fp8-tensor-max,
fp8-head-max, nvfp4 (as ModelOpt).
"""


def add_parser(sub) -> None:
    from kvq.eval.calibrate import SENSITIVITY, CalibrationSettings

    d = CalibrationSettings()
    p = sub.add_parser("calibrate", help="fit nuq codebooks (KVQuant) or transform coding (tc) "
                                         "per layer and K/V",
                       description="Fit a recipe's nuq codebooks, or its klt basis and alloc "
                                   "bit allocation, per layer and K/V on calibration text; "
                                   "write a YAML config and its safetensors.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=d.recipe,
                   help=f"recipe name: kvquant2/3/4, tc2/3/4, fp8-tensor, fp8-head, "
                        f"fp8-tensor-max, fp8-head-max, nvfp4 (default {d.recipe})")
    p.add_argument("--keys", help="keys recipe spec ending in nuq(b) or klt>alloc(b) "
                                  "(overrides the recipe's)")
    p.add_argument("--values", help="values recipe spec ending in nuq(b) or klt>alloc(b)")
    p.add_argument("--bits", type=float,
                   help="klt>alloc recipes: mean stored bits/element; alloc(2|3|4) is chosen per "
                        "layer and K/V to minimise the predicted loss (exact knapsack)")
    p.add_argument("--allocate", choices=("predicted", "measured"), default=d.allocate,
                   help="--bits costs: predicted (Fisher-weighted distortion model, default) or "
                        "measured (KL of the model's outputs with one layer's K or V quantized "
                        "at each width; one forward per layer, K/V, width and window)")
    p.add_argument("--measure-windows", type=int, default=d.measure_windows,
                   help=f"calibration windows --allocate measured runs (default "
                        f"{d.measure_windows})")
    p.add_argument("--out", default="calibrated.yaml",
                   help="output YAML (default calibrated.yaml; .safetensors written beside it; "
                        "files kvq did not write are never overwritten without --force)")
    p.add_argument("--model", help="smollm2 (default) or gemma3 (embedded), a local dir, "
                   ".gguf file or hub id")
    p.add_argument("--corpus", default=d.corpus,
                   help=f"calibration text (default {d.corpus}; never the eval split)")
    p.add_argument("--tokens", type=int, default=d.tokens,
                   help=f"calibration tokens (default {d.tokens})")
    p.add_argument("--context", type=int, default=d.context,
                   help=f"window length in tokens (default {d.context})")
    p.add_argument("--block", type=int, default=d.block,
                   help=f"cache block size the statistics are taken over (default {d.block})")
    p.add_argument("--sensitivity", choices=SENSITIVITY, default=d.sensitivity,
                   help="k-means sample weights: fisher (squared loss gradients, as KVQuant; "
                        "one backward per window) or none (default fisher)")
    p.add_argument("--levels", choices=("kmeans", "uniform", "gaussian"), default=d.levels,
                   help="kmeans (default); nuq: uniform (ablation: static scales, outliers "
                        "and sinks as the recipe, but evenly spaced levels); alloc: gaussian "
                        "(Lloyd-Max levels of a Gaussian scaled per channel)")
    p.add_argument("--key-rope", choices=("pre", "post"),
                   help="quantize keys before or after RoPE (default: the recipe's; kvquant: pre)")
    p.add_argument("--sinks", type=int, help="first tokens kept exact (default: the recipe's)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--force", action="store_true",
                   help="overwrite OUT and its .safetensors even when they are not files kvq "
                        "calibrate wrote, or lie in the --model folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    from kvq.cli.diagnose import set_threads
    from kvq.eval.calibrate import CalibrationSettings, calibrate

    settings = CalibrationSettings(recipe=args.recipe, keys=args.keys, values=args.values,
                                   model=args.model, corpus=args.corpus, tokens=args.tokens,
                                   context=args.context, block=args.block,
                                   sensitivity=args.sensitivity, levels=args.levels,
                                   key_rope=args.key_rope, bits=args.bits,
                                   allocate=args.allocate,
                                   measure_windows=args.measure_windows,
                                   sinks=args.sinks, device=args.device, force=args.force)
    set_threads(args.threads)
    cfg = calibrate(settings, args.out, progress=not args.quiet)
    from pathlib import Path

    out = Path(args.out)
    print(f"wrote {out} and {out.with_suffix('.safetensors')}: {cfg.label}, "
          f"{len(cfg.layers) + 1} layers")
    print(f"  keys   {cfg.keys.to_spec()}\n  values {cfg.values.to_spec()}  (layer 0)")
    return 0
