"""PNG heatmaps of a diagnosis: layers x KV heads, keys on top, values below.

Columns: channel outlier ratio, token-norm coefficient of variation, and the relative
attention-output error of the worst and the best preset (predicted error) at the lowest
bit width of the run
(K quantized alone / V quantized alone).
"""

from __future__ import annotations

from pathlib import Path


def write_png(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    layers = result["layers"]
    summ = result["summary"]["presets"]
    low = next(iter(result["summary"]["best"]))  # the lowest width (or the only one)
    ranked = sorted((n for n in summ if summ[n]["width"] == low),
                    key=lambda n: summ[n]["predicted_error"])
    worst, best = ranked[-1], ranked[0]
    cands = result["candidates"]
    panels = [("outlier ratio", lambda r, role: r["stats"][role]["outlier_ratio"], "magma"),
              ("token-norm CV", lambda r, role: r["stats"][role]["norm_cv"], "viridis")]
    for name in (worst, best):
        panels.append((f"attn error, {name}",
                       lambda r, role, n=name: r["errors"][role][cands[n][role]]["heads"],
                       "inferno"))
    fig, axes = plt.subplots(2, len(panels), figsize=(3.0 * len(panels), 7.5), squeeze=False)
    for row, role in enumerate(("keys", "values")):
        for col, (title, get, cmap) in enumerate(panels):
            ax = axes[row][col]
            data = np.array([get(r, role) for r in layers], dtype=float)
            im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
            ax.set_title(f"{role[0].upper()}: {title}", fontsize=8)
            ax.set_xlabel("KV head", fontsize=7)
            ax.set_ylabel("layer", fontsize=7)
            ax.set_xticks(range(data.shape[1]))
            ax.tick_params(labelsize=6)
            fig.colorbar(im, ax=ax, fraction=0.08)
    stress = result.get("stress")
    fig.suptitle(f"kvq diagnose: {result['model']['name']}"
                 + (f" (stress {stress['spec']})" if stress else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
