"""PNG plot of a comparison report (matplotlib, Agg backend; no display needed).

Panels: ΔPPL vs context length for each protocol (one line per pipeline, symlog y axis), ΔPPL vs
bits/element and mean KL divergence vs bits/element at the longest context for the first
protocol (bars: paired-bootstrap 95% intervals), and exact match vs haystack length when the
needle task ran.
"""

from __future__ import annotations

from pathlib import Path


def write_png(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = report["rows"]
    ppl = [r for r in rows if r["task"] == "ppl"]
    needle = [r for r in rows if r["task"] == "needle"] + _ruler_means(rows)
    protocols = list(dict.fromkeys(r["protocol"] for r in ppl))
    has_kl = any(r.get("kl") is not None for r in ppl)
    panels = len(protocols) + (1 if ppl else 0) + (1 if has_kl else 0) + (1 if needle else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    for proto in protocols:
        ax = axes.pop(0)
        for label, pts in _series(
            [r for r in ppl if r["protocol"] == proto], "context", "delta"
        ).items():
            if label != "fp16":
                ax.plot(*zip(*pts), marker="o", label=label, **style(label))
        ax.set(title=f"ΔPPL vs context ({proto})", xlabel="context (tokens)", ylabel="ΔPPL vs fp16")
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.axhline(0, color="grey", lw=0.8)
        ax.legend(fontsize=6, ncol=2)
    if ppl:
        ax = axes.pop(0)
        first = [r for r in ppl if r["protocol"] == protocols[0]]
        longest = max(r["context"] for r in first)
        at_longest = [r for r in first if r["context"] == longest and r["pipeline"] != "fp16"]
        _points(ax, at_longest, "delta", "delta_ci")
        ax.set(
            title=f"ΔPPL vs bits/element ({protocols[0]}, {longest} tokens)",
            xlabel="stored bits per K/V element",
            ylabel="ΔPPL vs fp16 (95% CI)",
        )
        ax.set_yscale("symlog", linthresh=0.1)
        if has_kl:
            ax = axes.pop(0)
            _points(ax, [r for r in at_longest if r.get("kl") is not None], "kl", "kl_ci")
            ax.set(title=f"KL from fp16 vs bits/element ({longest} tokens)",
                   xlabel="stored bits per K/V element", ylabel="mean KL, nats (95% CI)")
            ax.set_yscale("symlog", linthresh=1e-3)
    if needle:
        ax = axes.pop(0)
        for label, pts in _series(needle, "context", "value").items():
            ax.plot(*zip(*pts), marker="o", label=label, **style(label))
        ax.set(
            title="retrieval (ruler: mean over subtasks)",
            xlabel="haystack length (tokens)",
            ylabel="exact match / score",
            ylim=(-0.05, 1.05),
        )
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"kvq compare: {report['model']['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_matrix_png(matrix: dict, path: Path) -> Path:
    """One panel per (model, corpus) cell: ΔPPL in % of the fp16 PPL vs stored bits/element at
    the longest context of the first protocol, with 95% intervals, and the budget lines."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cells = matrix["cells"]
    cols = min(3, max(1, len(cells)))
    rows_n = (len(cells) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 4.2 * rows_n), squeeze=False)
    for ax, cell in zip(axes.flat, cells, strict=False):
        ppl = [r for r in cell["rows"] if r["task"] == "ppl"]
        if not ppl:
            continue
        proto = ppl[0]["protocol"]
        longest = max(r["context"] for r in ppl if r["protocol"] == proto)
        pool = [r for r in ppl if r["protocol"] == proto and r["context"] == longest]
        base = next((r["value"] for r in pool if r["pipeline"] == "fp16"), None)
        if not base:
            continue
        pct = [dict(r, delta=100 * r["delta"] / base,
                    delta_ci=[100 * c / base for c in r["delta_ci"]] if r.get("delta_ci")
                    else None)
               for r in pool if r["pipeline"] != "fp16" and r["delta"] is not None]
        _points(ax, pct, "delta", "delta_ci")
        for budget in (2.5, 3.5, 4.5):
            ax.axvline(budget, color="grey", lw=0.6, ls=":")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set(title=f"{cell['model']['name']} x {cell['settings']['corpus']} ({longest} tok)",
               xlabel="stored bits per K/V element", ylabel="ΔPPL, % of fp16 (95% CI)")
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    fig.suptitle("kvq compare matrix", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ruler_means(rows: list[dict]) -> list[dict]:
    """Ruler rows averaged over subtasks, one per (length, pipeline), labelled ``P (ruler)``."""
    acc: dict = {}
    for r in rows:
        if r["task"] == "ruler" and r["value"] is not None:
            acc.setdefault((r["context"], r["pipeline"]), []).append(r["value"])
    return [{"context": c, "pipeline": f"{p} (ruler)", "value": sum(v) / len(v)}
            for (c, p), v in acc.items()]


def _points(ax, rows: list[dict], y: str, ci: str) -> None:
    """One labelled point per row at (bits/element, ``y``) with its interval ``ci`` as a bar."""
    for r in rows:
        if r[y] is None:
            continue
        lo, hi = r.get(ci) or (r[y], r[y])
        ax.errorbar(r["bits_per_element"], r[y], yerr=[[max(r[y] - lo, 0)], [max(hi - r[y], 0)]],
                    fmt="o", ms=4, capsize=2, color=style(r["pipeline"])["color"])
        ax.annotate(r["pipeline"], (r["bits_per_element"], r[y]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")


def style(label: str) -> dict:
    """One colour per family (``naive4``/``naive3`` share it), one line style per bit width."""
    family, bits = label.rstrip("0123456789"), label[len(label.rstrip("0123456789")) :]
    colours = _STYLE.setdefault("colours", {})
    if family not in colours:
        colours[family] = f"C{len(colours) % 10}"
    dash = {"4": "-", "3": "--", "2": ":", "8": "-."}.get(bits, "-")
    return {"color": colours[family], "linestyle": dash}


_STYLE: dict = {}


def _series(rows: list[dict], x: str, y: str) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for r in rows:
        if r[y] is not None:
            out.setdefault(r["pipeline"], []).append((r[x], r[y]))
    return {k: sorted(v) for k, v in out.items()}
