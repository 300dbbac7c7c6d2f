"""``kvq explain SPEC|FILE``: the stages of a pipeline, bits per element and bytes for a shape."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  kvq explain 'nsep>pchan>int4'
  kvq explain kivi2 --head-dim 64 --seq 1024
  kvq explain pipeline.yaml --batch 8 --heads 32 --layers 32
"""


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="show stages, bits/element and bytes of a pipeline",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="spec string, preset name, or YAML/JSON file")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seq", type=int, default=4096, help="tokens (default 4096)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8, help="KV heads per layer (default 8)")
    p.add_argument("--layers", type=int, default=1)
    p.set_defaults(run=run)


def run(args) -> int:
    from kvq.errors import KVQError
    from kvq.loading import kv

    for name in ("head_dim", "seq", "batch", "heads", "layers"):
        if getattr(args, name) < 1:
            raise KVQError(f"--{name.replace('_', '-')} must be at least 1")
    cfg = kv(args.spec)
    cfg.check(num_layers=max(args.layers, 1 + max(cfg.layers, default=-1)), head_dim=args.head_dim)
    d, t = args.head_dim, args.seq
    heads = args.batch * args.heads
    print(f"{cfg.label}   (head_dim {d}, {t} tokens, batch {args.batch}, {args.heads} KV heads, "
          f"{args.layers} layer(s))")
    pre = " (quantized before RoPE)"
    groups = [("keys", cfg.keys, pre if cfg.key_rope == "pre" else ""), ("values", cfg.values, "")]
    groups += [(f"layer {i} {role}", p or cfg.keys, pre if cfg.key_rope_for(i) == "pre" and
                role == "keys" else "") for i, o in sorted(cfg.layers.items())
               for role, p in (("keys", o.keys), ("values", o.values))
               if p is not None or (role == "keys" and o.key_rope is not None)]
    for role, p, note in groups:
        print(f"\n{role}: {p.to_spec()}{note}")
        for s in p.steps:
            doc = (type(s).__doc__ or "").strip().splitlines()[0]
            print(f"  {s.role:<12} {s.to_spec():<22} {doc}")
        if not any(s.role == "granularity" for s in p.steps) and not p.is_identity:
            print(f"  {'granularity':<12} {'ptok':<22} (default: one scale per token)")
        bpe = p.bits_per_element(head_dim=d, seq=t)
        print(f"  bits/element {bpe:.3f}  ({bpe / 16:.3f}x fp16), "
              f"{_human(p.nbytes(t, d) * heads)} per layer for this shape")
    total = sum(sum(p.nbytes(t, d) for p in cfg.for_layer(i)) for i in range(args.layers)) * heads
    fp16 = 2 * args.layers * heads * t * d * 2
    if cfg.sinks:
        sinks = 2 * args.layers * heads * min(cfg.sinks, t) * d * 2  # exact, counted at fp16
        print(f"\nsinks: the first {cfg.sinks} token(s) of each sequence exact, {_human(sinks)}")
        total += sinks
    print(f"\ntotal K+V: {_human(total)} vs fp16 {_human(fp16)} ({total / fp16:.3f}x), "
          f"{cfg.bits_per_element(d, t, args.layers):.3f} bits/element on average")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
