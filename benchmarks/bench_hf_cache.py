"""Decode speed and bytes at rest: DynamicCache vs KVQCache vs transformers' QuantizedCache (quanto).

SmolLM2-135M-Instruct (kvq's default evaluation model), CPU, fp32. For each prompt length: one
prefill forward, then greedy decode of ``--new`` tokens, each cache measured in the same run, so
the ratios compare like with like. Prompts are random token ids (seeded): timing does not depend
on the text.

    python benchmarks/bench_hf_cache.py                       # 1024 and 4096 prompt tokens, 128 new
    python benchmarks/bench_hf_cache.py --prompts 512 --new 32 --quanto-new 8

quanto's cache re-quantizes everything it holds every ``residual_length`` tokens and dequantizes it
every step; with ``--quanto-new`` it decodes fewer tokens (ratios are per token).
"""

from __future__ import annotations

import argparse
import time

import torch


def make_caches(model_config, spec: str, residual: int, block: int):
    from transformers import DynamicCache, QuantizedCache

    from kvq.hf import KVQCache

    return {
        "DynamicCache": lambda: DynamicCache(config=model_config),
        f"KVQCache({spec})": lambda: KVQCache.from_spec(spec, model_config, residual=residual,
                                                         block=block),
        f"KVQCache({spec}, keep_dequantized)": lambda: KVQCache.from_spec(
            spec, model_config, residual=residual, block=block, keep_dequantized=True),
        "QuantizedCache(quanto, int4)": lambda: QuantizedCache(
            "quanto", model_config, nbits=4, residual_length=residual),
    }


@torch.inference_mode()
def run(model, cache, prompt: torch.Tensor, new: int) -> dict:
    """Prefill then greedy decode ``new`` tokens; times in seconds."""
    t0 = time.perf_counter()
    out = model(prompt, past_key_values=cache, use_cache=True)
    t1 = time.perf_counter()
    tokens = []
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(new):
        tokens.append(int(nxt))
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    t2 = time.perf_counter()
    return dict(prefill_s=t1 - t0, decode_s=t2 - t1, new=new, tokens=tokens, cache=cache)


def tensor_bytes(obj) -> int:
    """Bytes of the tensors inside ``obj`` (a tensor, quanto QTensor, list or None)."""
    if obj is None:
        return 0
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o) for o in obj)
    if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
        names, _ = obj.__tensor_flatten__()
        return sum(tensor_bytes(getattr(obj, n)) for n in names)
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    return 0


def held(cache) -> tuple[int, int, float]:
    """(bytes held, fp16 bytes of the same tokens, bits/element of the quantized part)."""
    from kvq.hf import KVQCache

    if isinstance(cache, KVQCache):
        t = cache.memory_report().total
        return t.total_bytes, t.fp16_bytes, t.bits_per_element
    total, elements, q_bytes, q_elems = 0, 0, 0, 0
    for layer in cache.layers:
        res = tensor_bytes([layer.keys, layer.values])
        qb = tensor_bytes([getattr(layer, "_quantized_keys", None),
                           getattr(layer, "_quantized_values", None)])
        n = layer.get_seq_length()
        b, h, _, d = layer.keys.shape if layer.keys.dim() == 4 else (1, 0, 0, 0)
        if qb:
            qk = layer._quantized_keys
            b, h, _, d = qk.shape
            q_bytes, q_elems = q_bytes + qb, q_elems + 2 * qk.numel()
        total += res + qb
        elements += 2 * b * h * n * d
    bits = 8 * q_bytes / q_elems if q_elems else float("nan")
    return total, 2 * elements, bits


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--new", type=int, default=128, help="greedy tokens decoded per cache")
    ap.add_argument("--quanto-new", type=int, default=None,
                    help="decode fewer tokens with the quanto cache (default: --new)")
    ap.add_argument("--spec", default="nsep>pchan>int4")
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--skip", nargs="*", default=[], help="cache names (substrings) to skip")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from kvq.eval.models import load

    model, _ = load()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    print(f"# SmolLM2-135M-Instruct, CPU fp32, torch threads {torch.get_num_threads()}, "
          f"spec {args.spec}, residual {args.residual}, block {args.block}")
    print("| prompt | cache | decoded | prefill s | decode ms/token | decode vs Dynamic | "
          "held MB | held vs fp16 | quantized bits/el | greedy match |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.prompts:
        prompt = torch.randint(0, cfg.vocab_size, (1, n), generator=g)
        base = None
        for name, make in make_caches(cfg, args.spec, args.residual, args.block).items():
            if any(s in name for s in args.skip):
                continue
            new = args.quanto_new if (args.quanto_new and "quanto" in name) else args.new
            r = run(model, make(), prompt, new)
            per_tok = r["decode_s"] / new
            if base is None:
                base = r
            ratio = per_tok / (base["decode_s"] / base["new"])
            total, fp16, bits = held(r["cache"])
            same = sum(a == b for a, b in zip(r["tokens"], base["tokens"])) / new
            print(f"| {n} | {name} | {new} | {r['prefill_s']:.2f} | {1000 * per_tok:.1f} | "
                  f"{ratio:.2f}x | {total / 2**20:.2f} | {total / fp16:.3f} | {bits:.2f} | "
                  f"{same:.2f} |", flush=True)
            del r


if __name__ == "__main__":
    main()
