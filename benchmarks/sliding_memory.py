"""Bytes held on a sliding-window model: KVQCache vs what DynamicCache really holds, same run.

Gemma 3 slides 5 of every 6 layers over a 512-token window; transformers' ``DynamicCache``
(``DynamicSlidingWindowLayer``) keeps only the newest 511 tokens there, so a quantized cache that
kept every token would pass it at a few thousand tokens. This script writes the same K/V into
``DynamicCache(config=...)`` and ``KVQCache(spec, config)`` through their own ``update`` (the
call every attention layer makes), a prompt of ``T`` tokens (the quantized prefill) then
``--new`` one-token decode steps (enough to fill KVQCache's exact window), and reports:

- ``kvq_bytes``: ``cache.nbytes`` (packed codes and metadata, exact window, in the K/V dtype);
- ``dynamic_fp16_bytes``: the K/V elements DynamicCache holds at that point, at 2 bytes each;
- ``all_tokens_fp16_bytes``: every token of every layer at 2 bytes (the old, wrong denominator);
- ``ratio = kvq_bytes / dynamic_fp16_bytes`` (target <= 0.35).

Bytes depend on shapes only (codes and scales have fixed sizes), so random K/V of the model's
geometry give the bytes a real forward gives. ``--config`` reads a model's ``config.json`` (e.g.
the converted Gemma 3 270M); without it a Gemma-3-shaped config is built: 18 layers, 1 KV head,
head_dim 256, window 512, 5 sliding : 1 full.

With ``--model DIR`` (a real model, e.g. the converted Gemma 3 270M) it runs the model instead:
one exact prefill of ``--tokens`` random token ids into a plain ``DynamicCache()`` (every layer
keeps everything), whose K/V are written into ``DynamicCache(config=...)`` and ``KVQCache`` (a
quantized prefill), then ``--steps`` greedy decode steps, round-robin, each timed alone on one
thread (decode time: median of per-step ratios against DynamicCache at the same step); bytes as
above after the decode.

    python benchmarks/sliding_memory.py                                  # 4k / 8k / 32k tokens
    python benchmarks/sliding_memory.py --config ~/.cache/kvq/models/gemma-3-270m
    python benchmarks/sliding_memory.py --model ~/.cache/kvq/models/gemma-3-270m \
        --tokens 4096,8192 --steps 16 --dtypes float32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def gemma3_shaped():
    """Gemma 3 270M's KV geometry on a tiny vocabulary (the cache never sees the rest)."""
    from transformers import Gemma3TextConfig

    types = (["sliding_attention"] * 5 + ["full_attention"]) * 3
    return Gemma3TextConfig(num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                            head_dim=256, hidden_size=640, intermediate_size=64, vocab_size=64,
                            sliding_window=512, layer_types=types, max_position_embeddings=32768)


def held_bytes(cache) -> int:
    """K/V elements a transformers cache holds, at 2 bytes each."""
    return sum(2 * (layer.keys.numel() + layer.values.numel()) for layer in cache.layers
               if layer.is_initialized)


def measure(config, spec: str, tokens: int, new: int, dtype, residual: int, block: int,
            seed: int = 0) -> dict:
    from transformers import DynamicCache

    from kvq.hf import KVQCache
    from kvq.hf.geometry import kv_geometry

    geom = kv_geometry(config)
    ref, cache = DynamicCache(config=config), KVQCache(spec, config, residual=residual,
                                                       block=block)
    g = torch.Generator().manual_seed(seed)
    shape = (1, geom.kv_heads, tokens, geom.head_dim)
    rows = {}
    with torch.no_grad():
        for i in range(geom.num_layers):
            k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
            for c in (ref, cache):
                c.update(k, v, i)
        rows["prefill"] = _row(ref, cache, geom, tokens)
        for _ in range(new):
            for i in range(geom.num_layers):
                k, v = (torch.randn((*shape[:2], 1, shape[3]), generator=g).to(dtype)
                        for _ in range(2))
                for c in (ref, cache):
                    c.update(k, v, i)
        rows[f"+{new} decode"] = _row(ref, cache, geom, tokens + new)
    return rows


def _row(ref, cache, geom, seen: int) -> dict:
    kvq, dyn = cache.nbytes, held_bytes(ref)
    return {"tokens": seen, "kvq_bytes": kvq, "dynamic_fp16_bytes": dyn,
            "all_tokens_fp16_bytes": 2 * 2 * geom.num_layers * geom.kv_heads * geom.head_dim
            * seen, "ratio": kvq / dyn,
            "max_sliding_tokens_held": max((la.held for la in cache.layers if la.is_sliding),
                                           default=0)}


@torch.inference_mode()
def measure_model(model, spec: str, tokens: int, steps: int, residual: int, block: int,
                  seed: int = 0) -> dict:
    """Real forwards: bytes held after ``steps`` decode steps and decode time vs DynamicCache."""
    import statistics
    import time

    from transformers import DynamicCache

    from kvq.hf import KVQCache, cache_kwargs
    from kvq.hf.geometry import kv_geometry

    geom = kv_geometry(model.config)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, model.config.vocab_size, (1, tokens), generator=g)
    full = DynamicCache()
    out = model(prompt, use_cache=True, **cache_kwargs(model, full))
    nxt = out.logits[:, -1:].argmax(-1)
    del out
    caches = {"DynamicCache": DynamicCache(config=model.config),
              "KVQCache": KVQCache(spec, model.config, residual=residual, block=block)}
    for cache in caches.values():
        for i, layer in enumerate(full.layers):
            cache.update(layer.keys, layer.values, i)
    del full
    state = {name: nxt for name in caches}
    times = {name: [] for name in caches}
    for _ in range(steps):
        for name, cache in caches.items():
            t0 = time.perf_counter()
            logits = model(state[name], use_cache=True, **cache_kwargs(model, cache)).logits
            times[name].append(time.perf_counter() - t0)
            state[name] = logits[:, -1:].argmax(-1)
    ratios = [k / d for k, d in zip(times["KVQCache"], times["DynamicCache"])]
    row = _row(caches["DynamicCache"], caches["KVQCache"], geom, tokens + steps)
    row.update(decode_ms_dynamic=1e3 * statistics.median(times["DynamicCache"]),
               decode_ms_kvq=1e3 * statistics.median(times["KVQCache"]),
               decode_ratio_median=statistics.median(ratios))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="a model directory or config.json (default: Gemma-3-shaped)")
    ap.add_argument("--spec", default="nsep>pchan>int4")
    ap.add_argument("--tokens", default="4096,8192,32768")
    ap.add_argument("--new", type=int, default=160, help="decode steps after the prompt")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="K/V (model) dtypes")
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--model", help="run this model (a directory) instead of random K/V")
    ap.add_argument("--steps", type=int, default=16, help="decode steps with --model")
    ap.add_argument("--attention", choices=("fast", "general"), default="fast",
                    help="with --model: KVQCache decode reads packed blocks (fast, default) or "
                         "dequantizes each layer (general)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.model:
        return _main_model(args)
    if args.config:
        from transformers import AutoConfig

        path = Path(args.config).expanduser()
        config, source = AutoConfig.from_pretrained(path if path.is_dir() else path.parent), \
            str(path)
    else:
        config, source = gemma3_shaped(), "Gemma-3-shaped random config"
    results = {"config": source, "spec": args.spec, "residual": args.residual,
               "block": args.block, "rows": []}
    print(f"{source}: {args.spec}, residual {args.residual}, block {args.block}")
    print(f"{'dtype':>9} {'tokens':>7} {'point':>12} {'kvq MB':>8} {'Dynamic fp16 MB':>16} "
          f"{'all-token fp16 MB':>18} {'ratio':>6} {'sliding held':>12}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for tokens in (int(t) for t in args.tokens.split(",")):
            for point, r in measure(config, args.spec, tokens, args.new, dtype, args.residual,
                                    args.block).items():
                results["rows"].append({"dtype": dtype_name, "point": point, **r})
                print(f"{dtype_name:>9} {r['tokens']:>7} {point:>12} {r['kvq_bytes'] / 1e6:>8.2f}"
                      f" {r['dynamic_fp16_bytes'] / 1e6:>16.2f} "
                      f"{r['all_tokens_fp16_bytes'] / 1e6:>18.2f} {r['ratio']:>6.3f} "
                      f"{r['max_sliding_tokens_held']:>12}", flush=True)
    if args.out:
        _write_json(Path(args.out), results)
    return 0


def _main_model(args) -> int:
    from transformers import AutoModelForCausalLM

    path = Path(args.model).expanduser()
    results = {"model": str(path), "spec": args.spec, "residual": args.residual,
               "block": args.block, "steps": args.steps, "attention": args.attention,
               "rows": []}
    print(f"{path}: {args.spec}, residual {args.residual}, block {args.block}, "
          f"{args.steps} decode steps, {args.attention} attention, 1 thread")
    for dtype_name in args.dtypes.split(","):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype_name))
        model.eval()
        if args.attention == "fast":
            import kvq.hf

            kvq.hf.enable_fast_attention(model)  # DynamicCache: SDPA; KVQCache: packed reads
        for tokens in (int(t) for t in args.tokens.split(",")):
            r = measure_model(model, args.spec, tokens, args.steps, args.residual, args.block)
            results["rows"].append({"dtype": dtype_name, **r})
            print(f"{dtype_name:>9} {r['tokens']:>7} kvq {r['kvq_bytes'] / 1e6:.2f} MB, "
                  f"DynamicCache fp16 {r['dynamic_fp16_bytes'] / 1e6:.2f} MB, ratio "
                  f"{r['ratio']:.3f} (all-token fp16 {r['all_tokens_fp16_bytes'] / 1e6:.2f} MB); "
                  f"decode {r['decode_ms_kvq']:.1f} vs {r['decode_ms_dynamic']:.1f} ms/token, "
                  f"median ratio {r['decode_ratio_median']:.2f}x", flush=True)
    if args.out:
        _write_json(Path(args.out), results)
    return 0



def _write_json(out: Path, results: dict) -> None:
    """Write ``results`` to ``out`` through a temporary file beside it (no half-written JSON)."""
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)

if __name__ == "__main__":
    raise SystemExit(main())
