"""``kvq diagnose``: why a model's K/V quantize badly, per layer and head -> table, JSON, PNG."""

from __future__ import annotations

import argparse

from kvq.cli.compare import _ints, _names

EXAMPLES = """examples:
  kvq diagnose                                   # SmolLM2-135M, every preset at 4 bits
  kvq diagnose --bits 3 --out diag3/
  kvq diagnose --stress                          # with planted key outliers (default setting)
  kvq diagnose --stress 'scale=16,layers=0-1,pairs=4' --bits 4
  kvq diagnose --bits all --out diag/ && kvq tune --bits 3 --diagnosis diag/diagnose.json

Calibration text defaults to shakespeare:calib, which kvq compare never scores.
Candidates: every registered preset (plugins' too) at --bits, plus --pipelines.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "diagnose",
        help="per-layer K/V outlier statistics, attention errors and the pipeline to run",
        description="Diagnose why K/V quantization breaks a model: per layer and KV head, "
        "outlier statistics, the attention-output error of each candidate pipeline, a "
        "classification (Mode 1 / Mode 2 / both / benign) and the winners.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(p)
    p.add_argument("--bits", type=_bits, default=[4], metavar="B,...|all",
                   help="bit widths of the candidate presets (default 4; 'all': every width)")
    p.add_argument("--out", default="kvq-diagnose",
                   help="directory for diagnose.json, diagnose.md, diagnose.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG heatmaps")
    p.set_defaults(run=run)


def add_common(p) -> None:
    """Options shared by ``kvq diagnose`` and ``kvq tune``."""
    p.add_argument("--model", help="smollm2 (default) or gemma3 (embedded), a local dir, "
                   ".gguf file or hub id")
    p.add_argument("--corpus", default="shakespeare:calib",
                   help="calibration text (default shakespeare:calib; also prose:calib, "
                   "code:calib: splits kvq compare does not score)")
    p.add_argument("--pipelines", type=_names, metavar="A,B,...",
                   help="extra candidates: presets, quoted specs or YAML files")
    p.add_argument("--context", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--windows", type=int, default=1, help="calibration windows (default 1)")
    p.add_argument("--queries", type=int, default=128,
                   help="query positions sampled per window (default 128)")
    p.add_argument("--block", type=int, default=32,
                   help="cache block size in tokens, as kvq compare (default 32)")
    p.add_argument("--stress", nargs="?", const="default", metavar="SPEC",
                   help="plant function-preserving key outliers first (default setting: "
                   "'scale=16,layers=0-3,pairs=4'; see docs/diagnose.md)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def settings_from(args, bits):
    from kvq.eval.diagnose import Settings

    return Settings(model=args.model, corpus=args.corpus, bits=bits, pipelines=args.pipelines,
                    context=args.context, windows=args.windows, queries=args.queries,
                    block=args.block, stress=args.stress, device=args.device)


def run(args) -> int:
    from pathlib import Path

    from kvq.eval.diagnose import run as diagnose
    from kvq.eval.diagnose.report import markdown, write

    settings = settings_from(args, args.bits)
    settings.validate()
    out = _out_dir(args.out)
    set_threads(args.threads)
    result = diagnose(settings, progress=not args.quiet)
    print(markdown(result))
    written = write(result, out)
    if not args.no_plot:
        from kvq.eval.diagnose.heatmap import write_png

        written.append(write_png(result, Path(out) / "diagnose.png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU threads (refused unless a positive integer)."""
    if threads is None:
        return
    if threads < 1:
        from kvq.eval.errors import EvalError

        raise EvalError(f"--threads must be a positive integer, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _out_dir(path: str):
    from pathlib import Path

    from kvq.eval.artifact import make_folder

    out = Path(path)
    if out.exists() and not out.is_dir():
        from kvq.eval.errors import EvalError

        raise EvalError(f"--out {path[:200]!r} exists and is not a directory")
    make_folder(out)
    return out


def _bits(text: str) -> list[int] | None:
    return None if text.strip() == "all" else _ints(text)
