"""``kvq export``: a KV config -> vLLM / llama.cpp arguments or a compressed-tensors / ModelOpt
checkpoint."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  kvq export turboquant4 --engine vllm --out export/vllm
  kvq export tuned4.5.yaml --engine llama.cpp --out export/llama --suggest
  kvq compare --pipelines tuned4.5.yaml,export/llama/suggested.yaml --protocols teacher-forced
  kvq calibrate --recipe fp8-tensor --out cal/fp8.yaml
  kvq export cal/fp8.yaml --engine compressed-tensors --model DIR --out ckpt/

An engine that has no exact format for CONFIG refuses it (exit 2) with the reason and the
closest configuration it runs; --suggest exports that one instead and writes it as
suggested.yaml, so kvq compare can score what the hand-over costs. --out must be new, empty or
an earlier kvq export directory (--force to write anyway).
"""


def add_parser(sub) -> None:
    from kvq.export import ENGINES

    p = sub.add_parser("export", help="hand a KV config to vLLM, llama.cpp, compressed-tensors "
                                      "or ModelOpt (exact, or refused with the closest)",
                       description="Map a KV config (preset, spec or YAML) onto what a serving "
                                   "engine runs: command-line flags, engine arguments or a "
                                   "checkpoint with calibrated KV scales.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="preset name, spec or YAML/JSON file")
    p.add_argument("--engine", required=True, choices=list(ENGINES))
    p.add_argument("--model", help="local model directory (default: smollm2)")
    p.add_argument("--out", help="directory to write the export into (default: print only)")
    p.add_argument("--suggest", action="store_true",
                   help="if the engine cannot run CONFIG exactly, export the closest "
                        "configuration it runs (written as suggested.yaml)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out that kvq export did not create")
    p.set_defaults(run=run)


def run(args) -> int:
    from kvq.export import export

    res = export(args.config, args.engine, model=args.model, out=args.out,
                 suggest=args.suggest, force=args.force)
    state = "exact" if res.exact else f"NOT exact ({res.reason}); exported the closest"
    print(f"{res.engine}: {res.config.label}: {state}")
    if res.command:
        print(f"  {res.command}")
    for note in res.notes:
        print(f"  note: {note}")
    if args.out:
        print(f"wrote {', '.join(sorted(res.files) + sorted(res.copies))} to {args.out}")
    return 0
