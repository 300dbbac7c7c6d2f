"""``kvq diagnose``: why a model's K/V quantize badly, layer by layer, and what to run instead.

>>> from kvq.eval.diagnose import Settings, run
>>> result = run(Settings(bits=[4]))  # doctest: +SKIP

One calibration forward over held-out text (default ``shakespeare:calib``, never the eval split)
captures every layer's queries, keys (before and after RoPE) and values
(:mod:`~kvq.eval.diagnose.capture`). Per layer and KV head it then reports outlier statistics
(:mod:`~kvq.eval.diagnose.stats`), the relative attention-output error of every candidate
(:mod:`~kvq.eval.diagnose.attention_error`; candidates: :mod:`~kvq.eval.diagnose.candidates`),
a classification (:mod:`~kvq.eval.diagnose.classify`) and the winners. The result is plain data
(JSON-ready); :mod:`~kvq.eval.diagnose.report` renders it.

Predicted error of a configuration: ``Σ_layers w_l (e_l(K) + e_l(V))`` where ``e_l`` is the
squared relative attention-output error of layer ``l`` with only K (only V) quantized and
``w_l`` the layer's weight in the residual stream (``LayerCapture.weight``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import kvq
from kvq.errors import KVQError
from kvq.eval import corpus as corpora
from kvq.eval import models
from kvq.eval.diagnose import stats as st
from kvq.eval.diagnose.attention_error import LayerAttention, all_errors
from kvq.eval.diagnose.candidates import collect
from kvq.eval.diagnose.capture import capture
from kvq.eval.diagnose.classify import MODE1_RATIO, MODE2_CV, classify
from kvq.eval.errors import EvalError


@dataclass
class Settings:
    """Everything a diagnosis depends on (recorded in the result)."""

    model: str | None = None
    corpus: str = "shakespeare:calib"
    bits: list[int] | None = field(default_factory=lambda: [4])  # None: every width
    pipelines: list[str] | None = None  # extra candidates beside the registered presets
    context: int = 1024
    windows: int = 1
    queries: int = 128
    block: int = 32
    stress: str | None = None
    device: str | None = None

    def validate(self) -> None:
        for name, value in (("--context", self.context), ("--windows", self.windows),
                            ("--queries", self.queries), ("--block", self.block)):
            if not isinstance(value, int) or value < 1:
                raise EvalError(f"{name} must be a positive integer, got {value!r}")
        if self.context < 2 * self.block:
            raise EvalError(f"--context {self.context} is shorter than two blocks of "
                            f"{self.block}; use --context {2 * self.block} or more")
        if self.bits is not None and (not self.bits or any(b < 1 for b in self.bits)):
            raise EvalError(f"--bits needs positive integers, got {self.bits}")
        if self.bits is not None:
            from kvq.presets import presets

            if not any({c.keys.bits, c.values.bits} <= set(self.bits)
                       for c in presets().values()):
                raise EvalError(f"--bits {self.bits}: no registered preset has those widths; "
                                "see `kvq list` for presets")
        if self.stress is not None:
            from kvq.eval.stress import StressSpec

            StressSpec.parse(self.stress)


def run(settings: Settings, progress: bool = True, loaded=None) -> dict:
    """Diagnose; ``loaded`` = an already loaded ``(model, tokenizer)`` to reuse
    (``settings.stress`` changes its weights in place)."""
    settings.validate()
    t0 = time.perf_counter()
    from kvq.eval.caches import check_context
    from kvq.eval.compare import _device

    device = _device(settings.device)
    docs = corpora.load_documents(settings.corpus)
    model, tokenizer = loaded or models.load(settings.model)
    check_context(model.config, settings.context)
    model.to(device)
    stress = None
    if settings.stress is not None:
        from kvq.eval.stress import apply_stress

        stress = apply_stress(model, settings.stress)
    from kvq.eval.caches import geometry

    try:
        n_layers, kv_heads, head_dim = geometry(model.config)
    except KVQError as err:
        raise EvalError(f"model {settings.model or models.DEFAULT_MODEL!r}: {err}") from None
    cands = collect(settings.bits, settings.pipelines, head_dim, n_layers, settings.block)
    ids = corpora.token_ids(tokenizer, docs)
    wins = corpora.windows(ids, [settings.context], settings.context * settings.windows)
    captured = capture(model, wins[settings.context].to(model.device), settings.queries)

    atts = [LayerAttention(c.q, c.k, c.v, c.positions, c.scaling, c.sliding_window)
            for c in captured]
    bar = _bar(progress, n_layers * (len(cands.keys) + len(cands.values)))
    errs = all_errors(atts, cands.keys, cands.values, cands.pairs(), settings.block,
                      tick=bar.update if bar is not None else lambda: None)
    if bar is not None:
        bar.close()
    del atts
    widths = {n: width(c.keys.bits, c.values.bits) for n, c in cands.presets.items()}
    pipe_bits = {"keys": {sp: str(p.bits) for sp, p in cands.keys.items()},
                 "values": {sp: str(p.bits) for sp, p in cands.values.items()}}
    layers = []
    for i, (c, e) in enumerate(zip(captured, errs)):
        s = {"keys": st.head_stats(c.k), "values": st.head_stats(c.v),
             "keys_pre_rope": st.head_stats(c.k_pre) if c.k_pre is not None else None}
        layers.append(_layer_row(i, c.weight, s, e, widths, pipe_bits))
    weighted = all(row["weight"] is not None for row in layers)
    if not weighted:
        for row in layers:
            row["weight"] = 1.0
    bits = {name: cfg.bits_per_element(head_dim, settings.block) for name, cfg in
            cands.presets.items()}
    return {
        "kvq_version": kvq.__version__,
        "model": {"name": models.display_name(settings.model), "layers": n_layers,
                  "kv_heads": kv_heads, "head_dim": head_dim,
                  "heads": c.q.shape[1], "dtype": str(model.dtype).replace("torch.", "")},
        "settings": asdict(settings),
        "stress": stress,
        "thresholds": {"mode1_outlier_ratio": MODE1_RATIO, "mode2_norm_cv": MODE2_CV},
        "error_model": "residual-weighted" if weighted else "attention (unweighted)",
        "candidates": {n: {"keys": k, "values": v, "bits_per_element": bits[n],
                           "width": widths[n]} for n, (k, v) in cands.pairs().items()},
        "skipped": cands.skipped,
        "bits": {"keys": {s: p.bits_per_element(head_dim, settings.block)
                          for s, p in cands.keys.items()},
                 "values": {s: p.bits_per_element(head_dim, settings.block)
                            for s, p in cands.values.items()}},
        "layers": layers,
        "summary": summary(layers, bits, widths),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def width(keys_bits: int, values_bits: int) -> str:
    """Bit-width label of a preset: ``"4"``, or ``"k8v4"`` when keys and values differ."""
    return str(keys_bits) if keys_bits == values_bits else f"k{keys_bits}v{values_bits}"


def _best(errs: dict, group: dict[str, str]) -> dict[str, str]:
    """{width: the name with the smallest error among the quantizing ones of that width}."""
    out: dict[str, str] = {}
    for name in sorted(errs, key=lambda n: errs[n]["energy"]):
        if group[name] != "16":
            out.setdefault(group[name], name)
    return dict(sorted(out.items()))


def _layer_row(i, weight, s, errs, widths: dict[str, str], bits: dict) -> dict:
    def pack(d):
        return {spec: {"heads": e.heads, "layer": e.layer, "energy": e.energy}
                for spec, e in d.items()}

    out = {"keys": pack(errs.keys), "values": pack(errs.values), "presets": pack(errs.joint)}
    return {"layer": i, "weight": weight, "stats": s, "mode": classify(s["keys"], s["values"]),
            "errors": out, "best": best_of(out, widths, bits)}


def best_of(errors: dict, widths: dict[str, str], bits: dict) -> dict:
    """Winners of one layer per bit width: presets (K and V together), key and value pipelines."""
    return {"preset": _best(errors["presets"], widths),
            **{role: _best(errors[role], bits[role]) for role in ("keys", "values")}}


def summary(layers: list[dict], bits: dict[str, float], widths: dict[str, str]) -> dict:
    """Per preset: bits/element, mean relative layer error, predicted error, layers won at its
    width; the winner per width (smallest predicted error) and the count of layers per mode."""
    presets = {}
    for name in bits:
        rel = [row["errors"]["presets"][name]["layer"] for row in layers]
        presets[name] = {
            "bits_per_element": bits[name],
            "width": widths[name],
            "mean_relative_error": sum(rel) / len(rel),
            "predicted_error": predicted(layers, name),
            "layers_won": sum(row["best"]["preset"].get(widths[name]) == name for row in layers),
        }
    modes: dict[str, int] = {}
    for row in layers:
        modes[row["mode"]] = modes.get(row["mode"], 0) + 1
    best = _best({n: {"energy": p["predicted_error"]} for n, p in presets.items()}, widths)
    return {"presets": presets, "best": best, "modes": modes}


def predicted(layers: list[dict], preset: str) -> float:
    """Σ_l w_l e_l(both quantized) for one preset, e_l = squared relative attention error."""
    return sum(row["weight"] * row["errors"]["presets"][preset]["energy"] for row in layers)


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="pipeline", dynamic_ncols=True, leave=False)
