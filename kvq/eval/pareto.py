"""Matched-bits view of a ``kvq compare`` report: the Pareto front of ΔPPL against stored bits.

    python -m kvq.eval.pareto A.json [B.json ...] --out OUT.png [--markdown] [--merged M.json]

Several reports (``kvq compare`` runs with the same model, corpus and settings, e.g. one run per
group of pipelines) are merged after checking that their settings and fp16 baselines agree.
A pipeline is on the front when no other one stores fewer (or as many) bits per element with a
lower (or equal) ΔPPL, one of them strictly. :func:`best_under` answers "which pipeline is best
within a budget of b bits/element".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def points(report: dict, protocol: str | None = None, context: int | None = None) -> list[dict]:
    """The ppl rows of one protocol and context (default: the first protocol, longest context),
    without the fp16 baseline: dicts with ``pipeline``, ``bits_per_element``, ``delta``."""
    ppl = [r for r in report["rows"] if r["task"] == "ppl" and r["delta"] is not None]
    if not ppl:
        raise ValueError("the report has no perplexity rows")
    protocol = protocol or ppl[0]["protocol"]
    rows = [r for r in ppl if r["protocol"] == protocol]
    if not rows:
        raise ValueError(f"no rows for protocol {protocol!r}")
    context = context or max(r["context"] for r in rows)
    rows = [r for r in rows if r["context"] == context and r["pipeline"] != "fp16"]
    if not rows:
        raise ValueError(f"no rows for context {context}")
    return rows


_SAME = ("model", "corpus", "contexts", "protocols", "tasks", "tokens", "block", "residual",
         "seed_continuation", "stream_steps")


def merge(reports: list[dict]) -> dict:
    """One report with the rows of all; raises ValueError unless their settings (all but the
    pipelines) and their fp16 baselines are identical."""
    first = reports[0]
    for other in reports[1:]:
        for key in _SAME:
            if other["settings"].get(key) != first["settings"].get(key):
                raise ValueError(f"reports differ in {key!r}: {first['settings'].get(key)!r} vs "
                                 f"{other['settings'].get(key)!r}")
        base = {(r["protocol"], r["context"], r["task"]): r["value"]
                for r in first["rows"] if r["pipeline"] == "fp16"}
        for r in other["rows"]:
            key = (r["protocol"], r["context"], r["task"])
            if r["pipeline"] == "fp16" and base.get(key, r["value"]) != r["value"]:
                raise ValueError(f"fp16 baselines differ at {key}: {base[key]} vs {r['value']}")
    seen, rows = set(), []
    for rep in reports:
        for r in rep["rows"]:
            key = (r["pipeline"], r["protocol"], r["context"], r["task"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    pipelines = {k: v for rep in reports for k, v in rep.get("pipelines", {}).items()}
    return {**first, "pipelines": pipelines, "rows": rows}


def markdown(rows: list[dict]) -> str:
    """Table by increasing bits/element; pipelines on the front in bold."""
    best = front(rows)
    lines = ["| pipeline | bits/elt (stored) | PPL | ΔPPL | Pareto |",
             "|:---|---:|---:|---:|:---:|"]
    for r in sorted(rows, key=lambda r: (r["bits_per_element"], r["delta"])):
        on = r in best
        name = f"**{r['pipeline']}**" if on else r["pipeline"]
        lines.append(f"| {name} | {r['bits_per_element']:.3f} | {r['value']:.2f} | "
                     f"{r['delta']:+.2f} | {'●' if on else ''} |")
    return "\n".join(lines)


def fp16_model_bits(report: dict, rows: list[dict]) -> list[dict]:
    """Rows with ``bits_per_element`` as KVQCache stores an fp16 model's K/V (layers a config
    skips at 16 bits), from each pipeline's config; the measured figure moves to
    ``measured_bits``. A model run in fp32 holds skipped layers in fp32, so only configs with
    ``skip`` may differ from the measurement; any other difference raises ValueError."""
    from kvq.kvconfig import KVConfig

    m, block = report["model"], report["settings"]["block"]
    out = []
    for r in rows:
        data = dict(report["pipelines"][r["pipeline"]])
        data.pop("name", None)
        cfg = KVConfig.from_dict(data)
        bits = cfg.bits_per_element(m["head_dim"], block, num_layers=m["layers"])
        if not cfg.skip and abs(bits - r["bits_per_element"]) > 1e-6:
            raise ValueError(f"{r['pipeline']}: measured {r['bits_per_element']} bits/element, "
                             f"its config says {bits}")
        out.append({**r, "bits_per_element": bits, "measured_bits": r["bits_per_element"]})
    return out


def front(rows: list[dict]) -> list[dict]:
    """The non-dominated rows, by increasing bits per element."""
    ordered = sorted(rows, key=lambda r: (r["bits_per_element"], r["delta"]))
    out: list[dict] = []
    for r in ordered:
        if not out or r["delta"] < out[-1]["delta"]:
            out.append(r)
    return out


def best_under(rows: list[dict], budget: float) -> dict | None:
    """The row with the lowest ΔPPL among those storing at most ``budget`` bits per element."""
    within = [r for r in rows if r["bits_per_element"] <= budget + 1e-9]
    return min(within, key=lambda r: r["delta"]) if within else None


def write_png(rows: list[dict], path: Path, title: str) -> Path:
    """Scatter of ΔPPL (symlog) against bits/element, the front as a line, every point labelled."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from kvq.eval.plot import style

    best = front(rows)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in rows:
        on = r in best
        ax.scatter(r["bits_per_element"], r["delta"], color=style(r["pipeline"])["color"],
                   s=40 if on else 18, edgecolors="black" if on else "none", zorder=3)
        ax.annotate(r["pipeline"], (r["bits_per_element"], r["delta"]), fontsize=6.5,
                    xytext=(3, 2), textcoords="offset points",
                    fontweight="bold" if on else "normal")
    ax.step([r["bits_per_element"] for r in best], [r["delta"] for r in best], where="post",
            color="black", lw=1, label="Pareto front")
    ax.set(title=title, xlabel="stored bits per K/V element (metadata included)",
           ylabel="ΔPPL vs fp16 cache")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(0, color="grey", lw=0.8)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="results.json written by kvq compare")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--protocol", help="default: the report's first protocol")
    ap.add_argument("--context", type=int, help="default: the longest context")
    ap.add_argument("--budgets", default="3.5,4.5", help="bits/element budgets to report")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--merged", type=Path, help="also write the merged report (JSON) here")
    ap.add_argument("--fp16-model", action="store_true",
                    help="bits/element as stored for an fp16 model (skipped layers at 16 bits)")
    args = ap.parse_args(argv)
    try:
        report = merge([json.loads(p.read_text()) for p in args.results])
        rows = points(report, args.protocol, args.context)
        if args.fp16_model:
            rows = fp16_model_bits(report, rows)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.merged:
        args.merged.write_text(json.dumps(report, indent=1) + "\n")
    r0 = rows[0]
    title = f"{report['model']['name']}: ΔPPL vs bits/element ({r0['protocol']}, {r0['context']})"
    write_png(rows, args.out, title)
    if args.markdown:
        print(markdown(rows))
    print("front: " + ", ".join(f"{r['pipeline']} ({r['bits_per_element']:.3g} b, "
                                f"{r['delta']:+.2f})" for r in front(rows)))
    for b in (float(v) for v in args.budgets.split(",")):
        best = best_under(rows, b)
        print(f"best at <= {b} bits/element: " + (
            f"{best['pipeline']} ({best['bits_per_element']:.3g} b, {best['delta']:+.2f})"
            if best else "none"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
