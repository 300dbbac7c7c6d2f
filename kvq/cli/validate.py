"""``kvq validate FILE...``: check pipeline files (and specs); exit 2 on the first bad one."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  kvq validate pipeline.yaml
  kvq validate configs/*.yaml --head-dim 64 --layers 30
"""


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="check YAML/JSON pipeline files or specs",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="YAML/JSON files (or spec strings)")
    p.add_argument("--head-dim", type=int, help="also check against this head_dim")
    p.add_argument("--layers", type=int, help="also check per-layer overrides against this count")
    p.set_defaults(run=run)


def run(args) -> int:
    from kvq.loading import kv

    for f in args.files:
        cfg = kv(f)
        if args.head_dim or args.layers:
            cfg.check(num_layers=args.layers or 10**9, head_dim=args.head_dim or 128)
        extra = f", {len(cfg.layers)} layer override(s)" if cfg.layers else ""
        extra += f", {cfg.sinks} sink(s)" if cfg.sinks else ""
        rope = " (before RoPE)" if cfg.key_rope == "pre" else ""
        print(f"ok  {f}: keys {cfg.keys.to_spec()}{rope}, values {cfg.values.to_spec()}{extra}")
    return 0
