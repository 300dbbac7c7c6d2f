"""Render a diagnosis (:func:`kvq.eval.diagnose.run`) as a table (terminal/Markdown) and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from kvq.eval.report import _clean, _f, _table


def markdown(result: dict, top: int = 6) -> str:
    """Summary, per-preset totals and one row per layer (the ``top`` best presets as columns)."""
    m, s, summ = result["model"], result["settings"], result["summary"]
    presets = sorted(summ["presets"], key=lambda n: summ["presets"][n]["predicted_error"])
    quantized = [n for n in presets if summ["presets"][n]["width"] != "16"]
    if len(summ["best"]) > 1:  # several widths: the best and the worst of each
        shown = []
        for w in summ["best"]:
            same = [n for n in quantized if summ["presets"][n]["width"] == w]
            shown += dict.fromkeys([same[0], same[-1]])
    else:
        shown = quantized[:top]
    stress = result.get("stress")
    head = [
        f"Model: {m['name']} ({m['layers']} layers, {m['heads']} heads, {m['kv_heads']} KV "
        f"heads, head_dim {m['head_dim']}); calibration: {s['corpus']}, {s['windows']} x "
        f"{s['context']} tokens, {s['queries']} query positions; blocks of {s['block']} tokens"
        + (f"; stress {stress['spec']}" if stress else "") + f"; {result['seconds']:.0f} s.",
        "",
        "Layers per mode: " + ", ".join(f"{k} {v}" for k, v in sorted(summ["modes"].items()))
        + f" (Mode 1: key outlier ratio >= {result['thresholds']['mode1_outlier_ratio']:g}; "
        f"Mode 2: token-norm CV >= {result['thresholds']['mode2_norm_cv']:g}). "
        "Best overall (smallest predicted error): "
        + ", ".join(f"**{n}** at {w} bits" for w, n in summ["best"].items()) + ".",
        "",
        _table(["rank", "preset", "bits/elt", "predicted error", "mean rel. error", "layers won"],
               [[i + 1, n, _f(summ["presets"][n]["bits_per_element"], 2),
                 _f(summ["presets"][n]["predicted_error"], 4),
                 _f(summ["presets"][n]["mean_relative_error"], 3),
                 summ["presets"][n]["layers_won"]] for i, n in enumerate(presets)]),
        "",
        "Per layer: statistics are the maximum over KV heads; errors are the relative "
        "attention-output error with K and V quantized by the preset; best: the winner at "
        "each width.",
        "",
    ]
    rows = []
    for row in result["layers"]:
        k, v = row["stats"]["keys"], row["stats"]["values"]
        errs = row["errors"]["presets"]
        rows.append([row["layer"], row["mode"], _f(max(k["outlier_ratio"]), 1),
                     _f(max(k["norm_cv"]), 2), _f(max(v["outlier_ratio"]), 1),
                     _f(max(v["norm_cv"]), 2), _f(max(k["kurtosis"]), 1)]
                    + [_f(errs[n]["layer"], 3) for n in shown]
                    + [", ".join(row["best"]["preset"].values())])
    header = ["layer", "mode", "K outlier", "K norm CV", "V outlier", "V norm CV", "K kurt"]
    lines = head + [_table(header + shown + ["best"], rows)]
    if result.get("skipped"):
        lines += ["", "Skipped (do not fit this model): " + "; ".join(
            f"{n}: {w}" for n, w in result["skipped"].items())]
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> list[Path]:
    """``diagnose.json`` and ``diagnose.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "diagnose.json", out / "diagnose.md"
    js.write_text(json.dumps(_clean(result), indent=1) + "\n", encoding="utf-8")
    md.write_text(markdown(result), encoding="utf-8")
    return [js, md]
