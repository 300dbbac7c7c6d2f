"""Several models x several corpora in one ``kvq compare``: one report, resumable.

>>> run_matrix(["smollm2", "gemma3"], ["prose", "code"], Settings(), out)  # doctest: +SKIP

Each (model, corpus) *cell* is an ordinary comparison (:func:`kvq.eval.compare.run`) whose
report is written to ``OUT/cells/`` as soon as it finishes (atomically). A later run with the
same settings reuses finished cells, so an interrupted matrix resumes where it stopped; a cell
made with other settings is refused rather than mixed in. Each model is loaded once for all its
corpora. The summary names, per cell, the pipeline with the lowest ΔPPL within each budget of
stored bits per element (:data:`BUDGETS`), at the longest context of the first protocol.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path

from kvq.eval import report as reports
from kvq.eval.assets import log
from kvq.eval.errors import EvalError

BUDGETS = (2.5, 3.5, 4.5)
CELLS = "cells"


def run_matrix(models: list[str], corpora: list[str], settings, out: Path,
               progress: bool = True) -> dict:
    """The matrix report ``{"kind": "matrix", "cells": [...], "summary": [...]}`` for every
    model x corpus, reusing the cells already finished under ``out/cells``."""
    from kvq.eval import models as model_registry
    from kvq.eval.compare import run

    settings.validate()
    (out / CELLS).mkdir(parents=True, exist_ok=True)
    t0, cells, n, i = time.perf_counter(), [], len(models) * len(corpora), 0
    for model in models:
        loaded = None
        for corpus in corpora:
            i += 1
            cell_settings = dataclasses.replace(settings, model=model, corpus=corpus)
            path = cell_path(out, model, corpus)
            done = _finished(path, cell_settings)
            if done is not None:
                log(f"kvq compare: cell {i}/{n} {model} x {corpus}: reused {path}")
                cells.append(done)
                continue
            log(f"kvq compare: cell {i}/{n} {model} x {corpus} ...")
            start = time.perf_counter()
            if loaded is None and settings.stress is None:  # stress edits the weights
                loaded = model_registry.load(model)
            cell = run(cell_settings, progress=progress, loaded=loaded)
            _write_atomic(path, cell)
            log(f"kvq compare: cell {i}/{n} {model} x {corpus} done in "
                f"{time.perf_counter() - start:.0f} s -> {path}")
            cells.append(cell)
    return {"kind": "matrix", "models": models, "corpora": corpora, "cells": cells,
            "summary": summary(cells), "seconds": round(time.perf_counter() - t0, 2)}


def cell_path(out: Path, model: str, corpus: str) -> Path:
    """``out/cells/<model>__<corpus>-<hash>.json`` (names made file-safe, hash keeps them apart)."""
    slug = "__".join(re.sub(r"[^A-Za-z0-9.-]+", "_", s)[-40:] for s in (model, corpus))
    tag = hashlib.sha256(f"{model}\0{corpus}".encode()).hexdigest()[:8]
    return out / CELLS / f"{slug}-{tag}.json"


def summary(cells: list[dict]) -> list[dict]:
    """Per cell and budget: the ppl row with the lowest ΔPPL among pipelines whose stored
    bits/element fit the budget (longest context, first protocol); None when none fits."""
    out = []
    for cell in cells:
        rows = [r for r in cell["rows"] if r["task"] == "ppl"]
        if not rows:
            continue
        protocol = rows[0]["protocol"]
        longest = max(r["context"] for r in rows if r["protocol"] == protocol)
        pool = [r for r in rows if r["protocol"] == protocol and r["context"] == longest]
        base = next((r for r in pool if r["pipeline"] == "fp16"), None)
        for budget in BUDGETS:
            fits = [r for r in pool if r["pipeline"] != "fp16" and r["delta"] is not None
                    and r["bits_per_element"] <= budget + 1e-9]
            best = min(fits, key=lambda r: r["delta"], default=None)
            out.append({"model": cell["model"]["name"], "corpus": cell["settings"]["corpus"],
                        "protocol": protocol, "context": longest, "budget": budget,
                        "fp16_ppl": base["value"] if base else None, "best": best})
    return out


def markdown(matrix: dict) -> str:
    """Summary table first, then each cell's own tables."""
    head = ["model", "corpus", "budget", "best pipeline", "bits/elt", "fp16 PPL", "ΔPPL",
            "ΔPPL %", "ΔPPL 95% CI", "KL", "KL 95% CI", "top-1"]
    body = []
    for s in matrix["summary"]:
        b, base = s["best"], s["fp16_ppl"]
        if b is None:
            body.append([s["model"], s["corpus"], f"≤ {s['budget']}", "none fits", *[""] * 8])
            continue
        body.append([s["model"], s["corpus"], f"≤ {s['budget']}", b["pipeline"],
                     reports._f(b["bits_per_element"], 2), reports._f(base, 3),
                     reports._signed(b["delta"], 3),
                     reports._signed(100 * b["delta"] / base, 1) if base else "n/a",
                     reports._ci(b.get("delta_ci"), 3, signed=True),
                     reports._f(b.get("kl"), 4), reports._ci(b.get("kl_ci"), 4),
                     reports._f(b.get("top1"), 3)])
    first = matrix["summary"][0] if matrix["summary"] else None
    where = f" ({first['protocol']}, {first['context']}-token windows)" if first else ""
    parts = [f"# kvq compare: {len(matrix['models'])} model(s) x {len(matrix['corpora'])} "
             f"corpora\n", f"**Best pipeline within each budget of stored bits/element{where}**"
             "\n", reports._table(head, body)]
    for cell in matrix["cells"]:
        parts.append(f"\n## {cell['model']['name']} x {cell['settings']['corpus']}\n")
        parts.append(reports.markdown(cell))
    return "\n".join(parts) + "\n"


def write(matrix: dict, out: Path, plot: bool = True) -> list[Path]:
    """``out/results.json``, ``results.md`` and (with ``plot``) ``results.png``."""
    written = [_write_atomic(out / "results.json", matrix)]
    md = out / "results.md"
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(markdown(matrix), encoding="utf-8")
    os.replace(tmp, md)
    written.append(md)
    if plot:
        from kvq.eval.plot import write_matrix_png

        written.append(write_matrix_png(matrix, out / "results.png"))
    return written


def _finished(path: Path, settings) -> dict | None:
    """The finished cell at ``path`` if it was made with ``settings``; None when absent."""
    if not path.is_file():
        return None
    try:
        cell = json.loads(path.read_text(encoding="utf-8"))
        made = cell["settings"]
        rows = cell["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EvalError(f"{path} is not a finished kvq compare cell; move it away or use "
                        "another --out") from None
    from kvq.eval import pipelines

    labels = pipelines.expand(settings.pipelines or pipelines.default_names(settings.bits),
                              settings.bits)
    want = json.loads(json.dumps(dataclasses.asdict(settings) | {"pipelines": list(labels)}))
    if made != want or not isinstance(rows, list):
        diff = sorted(k for k in set(made) | set(want) if made.get(k) != want.get(k))
        raise EvalError(f"{path} was made with other settings ({', '.join(diff)[:120]}); "
                        "use another --out, or the same settings to resume")
    return cell


def _write_atomic(path: Path, data: dict) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    reports.write_json(data, tmp)
    os.replace(tmp, path)
    return path
