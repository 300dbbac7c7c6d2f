"""Decode speed of calibrated configs (pre-RoPE keys, sinks, klt/alloc or nuq/sparse) on the fast
path, against DynamicCache and the general path, in one run.

SmolLM2-135M-Instruct (kvq's default model), CPU, fp32. Caches: ``DynamicCache``; for each
config in ``--configs`` (a YAML written by ``kvq calibrate`` or a preset name),
``KVQCache(cfg, model)`` on the general path (``attention="dequantize"``) and on the fast path
(``attention="fast"``). For each prompt length one exact prefill fills the DynamicCache; its
K/V are written into every other cache through ``update`` after the model's rotary module has
seen the prompt's positions (its forward hook is how a pre-RoPE cache learns them), so all
caches start from the same prompt K/V. Then every cache decodes greedily, round-robin, one
token at a time (``bench_hf_cache.decode``); the ratio is the median over steps of the per-step
time against DynamicCache at the same step.

    python benchmarks/bench_fast_calibrated.py --configs tc3.yaml --prompts 4096 8192 --new 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_hf_cache import decode, prompt_ids  # noqa: E402


def makers(model, configs: list[str], general: bool) -> dict:
    from transformers import DynamicCache

    import kvq
    from kvq.hf import KVQCache

    out = {"DynamicCache": lambda: DynamicCache(config=model.config)}
    for c in configs:
        cfg = kvq.load(c) if c.endswith((".yaml", ".yml")) else c
        name = Path(c).stem
        if general:
            out[f"{name} general"] = lambda cfg=cfg: KVQCache(cfg, model, attention="dequantize")
        out[f"{name} fast"] = lambda cfg=cfg: KVQCache(cfg, model, attention="fast")
    return out


@torch.inference_mode()
def fill(model, prompt: torch.Tensor, make: dict) -> dict:
    """Prefill DynamicCache exactly, then write its K/V into every other cache."""
    from kvq.hf import cache_kwargs

    names = list(make)
    ref = make[names[0]]()
    out = model(prompt, use_cache=True, **cache_kwargs(model, ref))
    nxt = out.logits[:, -1:].argmax(-1)
    state = {names[0]: [ref, nxt]}
    rotary = [m for n, m in model.named_modules() if n.endswith("rotary_emb")][0]
    positions = torch.arange(prompt.shape[1])[None]
    for name in names[1:]:
        cache = make[name]()
        rotary(ref.layers[0].keys, position_ids=positions)  # the positions, as a forward sees
        for i, layer in enumerate(ref.layers):
            cache.update(layer.keys, layer.values, i)
        state[name] = [cache, nxt]
    return state


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", required=True, help="YAML files or preset names")
    ap.add_argument("--prompts", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--new", type=int, default=16, help="decode steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-general", action="store_true", help="skip the general path")
    ap.add_argument("--model", default=None, help="kvq model name or path (default SmolLM2)")
    args = ap.parse_args(argv)

    import kvq.hf
    from kvq.eval.models import load

    model, tokenizer = load(args.model)
    kvq.hf.enable_fast_attention(model)
    torch.set_num_threads(args.threads)
    ids = prompt_ids(tokenizer, max(args.prompts))
    print(f"# {args.model or 'SmolLM2-135M-Instruct'}, CPU fp32, {args.threads} thread(s), "
          f"{args.new} decode steps, round-robin")
    print("| prompt | cache | ms/token | vs DynamicCache (median, p10-p90) | greedy match |")
    print("|---|---|---|---|---|")
    for n in args.prompts:
        load_before = os.getloadavg()[0]
        state = fill(model, ids[:, :n], makers(model, args.configs, not args.no_general))
        res = decode(model, state, args.new, [args.threads])
        base = res["times"]["DynamicCache"][args.threads]
        for name, per in res["times"].items():
            t = per[args.threads]
            ratios = sorted(x / y for x, y in zip(t, base))
            q = statistics.quantiles(ratios, n=10) if len(ratios) > 1 else ratios * 9
            same = sum(a == b for a, b in zip(res["tokens"][name], res["tokens"]["DynamicCache"]))
            print(f"| {n} | {name} | {1000 * statistics.median(t):.1f} | "
                  f"{statistics.median(ratios):.2f}x ({q[0]:.2f}-{q[-1]:.2f}) | "
                  f"{same / len(t):.2f} |", flush=True)
        print(f"# prompt {n}: load average before {load_before:.2f}, after "
              f"{os.getloadavg()[0]:.2f}")
        del state


if __name__ == "__main__":
    main()
