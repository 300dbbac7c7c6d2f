"""Write a comparison report (from :func:`kvq.eval.compare.run`) as JSON and Markdown."""

from __future__ import annotations

import json
import math
from pathlib import Path


def write_json(report: dict, path: Path) -> Path:
    """The whole report; NaN/inf become ``null``."""
    path.write_text(json.dumps(_clean(report), indent=2) + "\n", encoding="utf-8")
    return path


def markdown(report: dict) -> str:
    """One table per (task, protocol): rows by context, then pipeline in run order."""
    m = report["model"]
    s = report["settings"]
    head = (
        f"Model: {m['name']} ({m['layers']} layers, {m['kv_heads']} KV heads, head_dim "
        f"{m['head_dim']}, {m['dtype']}); corpus: {s['corpus']}; {s['tokens']} tokens per "
        f"context; total {report['seconds']:.0f} s on {report['machine']['threads']} threads."
    )
    parts = [head]
    for (task, protocol), rows in _groups(report["rows"]).items():
        parts.append(f"\n**{task} / {protocol}**\n")
        if task in ("needle", "ruler"):
            parts.append(
                _table(
                    ["length", "pipeline", "bits/elt", "exact match" if task == "needle"
                     else "score", "Δ vs fp16", "time s"],
                    [
                        [
                            r["context"],
                            r["pipeline"],
                            _f(r["bits_per_element"], 2),
                            _f(r["value"], 2),
                            _signed(r["delta"], 2),
                            _f(r["seconds"], 1),
                        ]
                        for r in rows
                    ],
                )
            )
        else:
            parts.append(_ppl_table(rows))
    if any(r["task"] == "ppl" and r.get("delta_ci") for r in report["rows"]):
        parts.append(CI_NOTE)
    return "\n".join(parts) + "\n"


CI_NOTE = (
    "\nKL: mean KL divergence of each position's next-token distribution from the fp16 run "
    "(nats), p99 its 99th percentile over scored tokens; top-1: share of positions whose most "
    "likely token equals fp16's. [low, high]: paired block-bootstrap 95% intervals (blocks of "
    "128 scored tokens within a window, 2,000 resamples, seed 0; kvq.eval.bootstrap)."
)


def _ppl_table(rows: list[dict]) -> str:
    return _table(
        ["context", "pipeline", "bits/elt", "PPL", "ΔPPL", "ΔPPL 95% CI", "KL", "KL 95% CI",
         "KL p99", "top-1", "cache KiB", "× fp16", "time s"],
        [
            [
                r["context"],
                r["pipeline"],
                _f(r["bits_per_element"], 2),
                _f(r["value"], 3),
                _signed(r["delta"], 3),
                _ci(r.get("delta_ci"), 3, signed=True),
                _f(r.get("kl"), 4),
                _ci(r.get("kl_ci"), 4),
                _f(r.get("kl_p99"), 3),
                _f(r.get("top1"), 3),
                _f(r["cache_bytes"] / 1024, 0),
                _f(r["cache_bytes"] / r["fp16_bytes"], 3) if r["fp16_bytes"] else "",
                _f(r["seconds"], 1),
            ]
            for r in rows
        ],
    )


def _ci(ci, digits: int, signed: bool = False) -> str:
    if not ci:
        return "n/a"
    fmt = _signed if signed else _f
    return f"[{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def write_markdown(report: dict, path: Path) -> Path:
    path.write_text(markdown(report), encoding="utf-8")
    return path


def _groups(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["task"], r["protocol"]), []).append(r)
    return out


def _table(header: list[str], rows: list[list]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i != 1 else ":---" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _f(x, digits: int) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def _signed(x, digits: int) -> str:
    return _f(x, digits) if x is None or not math.isfinite(x) else f"{x:+,.{digits}f}"


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x
