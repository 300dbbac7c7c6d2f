"""Cost of ``kvq compare``: each protocol per pipeline vs a plain forward, and the default run.

SmolLM2-135M-Instruct + Shakespeare (the embedded defaults), CPU. The baseline is the model's
plain forward (no cache) over the same windows, measured in the same run, so the printed ratios
say what the K/V quantization and the protocol add. ``--full`` then times the default
``kvq compare`` end to end (the target: under 10 minutes on 2 CPU cores).

    python benchmarks/bench_compare.py                   # ratios, contexts 512 and 2048
    python benchmarks/bench_compare.py --threads 2 --full
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def plain_seconds(model, windows) -> float:
    with torch.inference_mode():
        model(windows[0][None], use_cache=False)  # warm-up, not timed
        start = time.perf_counter()
        for w in windows:
            model(w[None], use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--context", default="512,2048")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--pipelines", default="naive4,nsep-pchan4,kivi4,quanto4,quarot4")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--full", action="store_true", help="also time the default `kvq compare`")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from kvq.eval import corpus, models, pipelines
    from kvq.eval.protocols import get_protocol

    t0 = time.perf_counter()
    model, tok = models.load()
    print(
        f"model load {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    contexts = [int(c) for c in args.context.split(",")]
    wins = corpus.windows(corpus.token_ids(tok, corpus.load_documents()), contexts, args.tokens)
    configs = pipelines.expand(args.pipelines.split(","), None)
    print(f"{'context':>7} {'protocol':<15} {'pipeline':<12} {'seconds':>8} {'x plain':>8}")
    for context in contexts:
        base = plain_seconds(model, wins[context])
        print(f"{context:>7} {'plain forward':<15} {'-':<12} {base:8.2f} {1.0:8.2f}")
        for name in ("teacher-forced", "seed"):
            scores = get_protocol(name).run(model, wins[context], configs)
            for label, s in scores.items():
                print(
                    f"{context:>7} {name:<15} {label:<12} {s.seconds:8.2f} {s.seconds / base:8.2f}"
                )
    if args.full:
        from kvq.eval.compare import Settings, run

        start = time.perf_counter()
        run(Settings(bits=list(pipelines.DEFAULT_BITS)), progress=False, loaded=(model, tok))
        print(f"default kvq compare (model already loaded): {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
