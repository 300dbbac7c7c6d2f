"""``kvq list``: registered steps, backends, presets and plugins."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  kvq list                 everything
  kvq list presets         named K/V configurations (usable wherever a spec is)
  kvq list steps           transforms, granularities and quantizers
"""


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="list steps, backends, presets and plugins", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["steps", "backends", "presets", "plugins"],
                   help="only this kind")
    p.set_defaults(run=run)


BLOCK, LAYERS = 32, 30  # KVQCache's default block; SmolLM2-135M's depth (the default model)


def run(args) -> int:
    from kvq.plugins import plugin_names
    from kvq.registry import BACKENDS, PRESETS, STEPS

    show = [args.what] if args.what else ["steps", "backends", "presets", "plugins"]
    if "steps" in show:
        print("steps:")
        for e in STEPS.entries():
            cls = e.load()
            doc = (cls.__doc__ or "").strip().splitlines()[0]
            fixed = ", ".join(f"{k}={v}" for k, v in e.defaults.items())
            fixed = f" [{fixed}]" if fixed else ""
            print(f"  {e.name:<8} {cls.role:<12} {doc}{fixed}" + _source(e))
    if "backends" in show:
        print("backends:")
        for e in BACKENDS.entries():
            print(f"  {e.name:<8} {e.target if isinstance(e.target, str) else e.target.__name__}"
                  + _source(e))
    if "presets" in show:
        print(f"presets:  bits/element as KVQCache stores them (blocks of {BLOCK} tokens, "
              f"metadata included; skipped layers at fp16 over {LAYERS} layers) at head_dim 64 "
              "/ 128")
        for e in PRESETS.entries():
            cfg = e.load()()
            b64, b128 = (cfg.bits_per_element(head_dim=d, seq=BLOCK, num_layers=LAYERS)
                         for d in (64, 128))
            skip = f"  skip {list(cfg.skip)}" if cfg.skip else ""
            print(f"  {e.name:<16} {b64:6.3f} {b128:6.3f}  K: {cfg.keys.to_spec():<28} "
                  f"V: {cfg.values.to_spec()}{skip}" + _source(e))
    if "plugins" in show:
        print("plugins:")
        for name in plugin_names():
            print(f"  {name}")
    return 0


def _source(entry) -> str:
    return "" if entry.source == "kvq" else f"  (plugin {entry.source})"
