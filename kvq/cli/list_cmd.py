"""``kvq list``: registered steps, backends, presets and plugins."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  kvq list                 everything
  kvq list presets         named K/V configurations (usable wherever a spec is)
  kvq list steps           transforms, granularities and quantizers
  kvq list plugins         each plugin: ok, broken (with the reason) or disabled
  KVQ_DISABLE_PLUGINS=a,b kvq list   skip the plugins named a and b
"""


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="list steps, backends, presets and plugins", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["steps", "backends", "presets", "plugins"],
                   help="only this kind")
    p.add_argument("--plugins", action="store_true", help="same as 'kvq list plugins'")
    p.set_defaults(run=run)


BLOCK, LAYERS = 32, 30  # KVQCache's default block; SmolLM2-135M's depth (the default model)


def run(args) -> int:
    import warnings

    from kvq.plugins import KVQPluginWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KVQPluginWarning)  # broken plugins are listed below
        return _list(args)


def _list(args) -> int:
    from kvq.plugins import plugin_status
    from kvq.registry import BACKENDS, PRESETS, STEPS

    what = "plugins" if args.plugins else args.what
    show = [what] if what else ["steps", "backends", "presets", "plugins"]
    if "steps" in show:
        print("steps:")
        for e, cls in STEPS.loaded():
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
              f"metadata included; skipped layers at fp16 over {LAYERS} layers; sink tokens, "
              "held once per sequence, not included) at head_dim 64 / 128")
        for e, factory in PRESETS.loaded():
            cfg = factory()
            blocks = cfg.model_copy(update={"sinks": 0})  # sinks are per sequence, not per block
            b64, b128 = (blocks.bits_per_element(head_dim=d, seq=BLOCK, num_layers=LAYERS)
                         for d in (64, 128))
            extra = f"  skip {list(cfg.skip)}" if cfg.skip else ""
            extra += "  keys pre-RoPE" if cfg.uses_pre_rope else ""
            extra += f"  sinks {cfg.sinks}" if cfg.sinks else ""
            print(f"  {e.name:<16} {b64:6.3f} {b128:6.3f}  K: {cfg.keys.to_spec():<28} "
                  f"V: {cfg.values.to_spec()}{extra}" + _source(e))
    if "plugins" in show:
        print("plugins:")
        for st in plugin_status():
            detail = f"{st.components} component(s)" if st.state == "ok" else st.reason
            print(f"  {st.name:<14} {st.state:<9} {detail}")
    return 0


def _source(entry) -> str:
    return "" if entry.source == "kvq" else f"  (plugin {entry.source})"
