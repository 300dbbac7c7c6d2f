"""The comparison runner behind ``kvq compare``: one model, loaded once, many K/V pipelines.

>>> from kvq.eval.compare import Settings, run
>>> report = run(Settings(pipelines=["naive4", "nsep-pchan4"], contexts=[512]))  # doctest: +SKIP

Tasks: ``ppl`` (perplexity under the chosen protocols, on corpus windows; see
:mod:`kvq.eval.protocols`) and ``needle`` (needle-in-a-haystack exact match with greedy
generation through a fresh :class:`kvq.hf.KVQCache` per document). The report is plain data:
``{"model", "corpus", "settings", "rows", ...}``, one row per (task, protocol, context, pipeline),
written by :mod:`kvq.eval.report`.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field

import kvq
from kvq.errors import KVQError
from kvq.eval import corpus as corpora
from kvq.eval import models, pipelines
from kvq.eval.caches import geometry, is_identity
from kvq.eval.errors import EvalError
from kvq.eval.protocols import get_protocol

TASKS = ("ppl", "needle", "ruler")


@dataclass
class Settings:
    """Everything a comparison depends on (recorded in the report)."""

    model: str | None = None
    corpus: str = corpora.DEFAULT_CORPUS
    pipelines: list[str] | None = None
    bits: list[int] | None = None
    contexts: list[int] = field(default_factory=lambda: [512, 2048])
    protocols: list[str] = field(default_factory=lambda: ["teacher-forced", "seed"])
    tasks: list[str] = field(default_factory=lambda: ["ppl"])
    tokens: int = 4096
    seed_continuation: int = 32
    stream_steps: int = 32
    block: int = 32
    residual: int = 128
    needle_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    needle_per_length: int = 4
    device: str | None = None  # default: cuda when available, else cpu
    stress: str | None = None  # kvq.eval.stress spec: plant key outliers first ("default")

    def validate(self) -> None:
        """Checks that need no model (run before loading it)."""
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise EvalError(f"unknown task {bad[0]!r}; known: {', '.join(TASKS)}")
        for name, values in (
            ("--context", self.contexts),
            ("--bits", self.bits or [4]),
            ("--needle-lengths", self.needle_lengths),
        ):
            if not values or any(v < 1 for v in values):
                raise EvalError(f"{name} needs positive integers, got {values}")
        if self.bits and any(b not in (2, 3, 4, 8) for b in self.bits):
            raise EvalError(f"--bits takes 2, 3, 4 or 8, got {self.bits}")
        if self.stress is not None:
            from kvq.eval.stress import StressSpec

            StressSpec.parse(self.stress)
        if self.tokens < 1:
            raise EvalError(f"--tokens must be positive, got {self.tokens}")
        for name in self.protocols:
            get_protocol(name, **self.protocol_options()).check(min(self.contexts))

    def protocol_options(self) -> dict:
        return dict(
            continuation=self.seed_continuation,
            steps=self.stream_steps,
            residual=self.residual,
            block=self.block,
        )


def run(settings: Settings, progress: bool = True, loaded=None) -> dict:
    """Run the comparison; ``loaded`` = an already loaded ``(model, tokenizer)`` to reuse."""
    settings.validate()
    configs = pipelines.expand(
        settings.pipelines or pipelines.default_names(settings.bits), settings.bits
    )
    t0 = time.perf_counter()
    model, tokenizer = loaded or models.load(settings.model)
    try:
        model.to(_device(settings.device))
    except (RuntimeError, AssertionError) as err:  # e.g. "Torch not compiled with CUDA enabled"
        raise EvalError(f"--device {settings.device!r}: {err}") from None
    load_s = time.perf_counter() - t0
    stress = None
    if settings.stress is not None:
        from kvq.eval.stress import apply_stress

        stress = apply_stress(model, settings.stress)
    try:
        layers, kv_heads, head_dim = geometry(model.config)
    except KVQError as err:
        raise EvalError(f"model {settings.model or models.DEFAULT_MODEL!r}: {err}") from None
    _check_fit(model.config, settings, configs, layers, head_dim)

    rows: list[dict] = []
    bar = _Progress(progress)
    if "ppl" in settings.tasks:
        rows += _ppl_rows(model, tokenizer, settings, configs, bar)
    if "needle" in settings.tasks:
        from kvq.eval.needle_runner import needle_rows

        rows += needle_rows(model, tokenizer, settings, configs, bar)
    if "ruler" in settings.tasks:
        from kvq.eval.ruler_runner import ruler_rows

        rows += ruler_rows(model, tokenizer, settings, configs, bar)
    bar.close()
    return {
        "kvq_version": kvq.__version__,
        "model": {
            "name": models.display_name(settings.model),
            "layers": layers,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "dtype": str(model.dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "settings": asdict(settings) | {"pipelines": list(configs)},
        "pipelines": {label: cfg.to_dict() for label, cfg in configs.items()},
        "rows": rows,
        "stress": stress,
        "load_seconds": round(load_s, 2),
        "seconds": round(time.perf_counter() - t0, 2),
        "machine": _machine(),
    }


def _ppl_rows(model, tokenizer, settings, configs, bar) -> list[dict]:
    ids = corpora.token_ids(tokenizer, corpora.load_documents(settings.corpus))
    wins = {
        length: w.to(model.device)
        for length, w in corpora.windows(ids, settings.contexts, settings.tokens).items()
    }
    units = sum(len(wins[c]) for c in settings.contexts) * len(configs) * len(settings.protocols)
    bar.total(units)
    rows = []
    for proto_name in settings.protocols:
        proto = get_protocol(proto_name, **settings.protocol_options())
        for context in settings.contexts:
            bar.describe(f"{proto_name} @ {context}")
            scores = proto.run(model, wins[context], configs, tick=bar.tick)
            base = scores[pipelines.BASELINE].ppl
            for label, s in scores.items():
                identity = is_identity(configs[label])
                nbytes = s.fp16_bytes if identity else s.cache_bytes
                rows.append(
                    {
                        "task": "ppl",
                        "protocol": proto_name,
                        "context": context,
                        "pipeline": label,
                        "metric": "ppl",
                        "value": s.ppl,
                        "delta": s.ppl - base,
                        "bits_per_element": 16.0
                        if identity
                        else 16 * s.cache_bytes / max(s.fp16_bytes, 1),
                        "cache_bytes": nbytes // max(s.windows, 1),
                        "fp16_bytes": s.fp16_bytes // max(s.windows, 1),
                        "seconds": round(s.seconds, 3),
                        "tokens": s.tokens,
                        "windows": s.windows,
                    }
                    | quality(s, scores[pipelines.BASELINE])
                )
    return rows


def quality(s, base) -> dict:
    """KL divergence from the fp16 run (mean, 99th percentile), top-1 agreement, and paired
    block-bootstrap 95% intervals of ΔPPL and mean KL (:mod:`kvq.eval.bootstrap`)."""
    import torch

    from kvq.eval import bootstrap

    out = {"kl": s.kl_mean(), "kl_p99": s.kl_quantile(0.99), "top1": s.top1(),
           "delta_ci": None, "kl_ci": None}
    if not s.token_nll or [t.numel() for t in s.token_nll] != [t.numel() for t in base.token_nll]:
        return out
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    ci = bootstrap.paired(cat(s.token_nll), cat(base.token_nll),
                          cat(s.token_kl) if s.has_reference else None,
                          bootstrap.block_ids([t.numel() for t in s.token_nll]))
    for key, name in (("delta_ppl", "delta_ci"), ("kl", "kl_ci")):
        if ci[key] is not None:
            out[name] = [ci[key].low, ci[key].high]
    return out


def _check_fit(model_config, settings, configs, layers, head_dim) -> None:
    from kvq.eval.caches import check_context

    asked = max(
        (settings.contexts if "ppl" in settings.tasks else [])
        + (settings.needle_lengths if {"needle", "ruler"} & set(settings.tasks) else [])
    )
    check_context(model_config, asked, "--context (and --needle-lengths)")
    for label, cfg in configs.items():
        try:
            cfg.check(num_layers=layers, head_dim=head_dim)
        except KVQError as err:
            raise EvalError(f"pipeline {label!r} cannot run on this model: {err}") from None


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise EvalError(f"--device {name[:80]!r}: {str(err)[:200]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name[:80]!r}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise EvalError(f"--device {name[:80]!r}: there are {torch.cuda.device_count()} CUDA "
                        "device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise EvalError(f"--device {name[:80]!r}: MPS is not available here; use --device cpu")
    return device


def _machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


class _Progress:
    """A tqdm bar on stderr (or nothing)."""

    def __init__(self, enabled: bool):
        self.enabled, self._bar = enabled, None

    def total(self, n: int) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            if self._bar is None:
                self._bar = tqdm(total=n, unit="run", dynamic_ncols=True, leave=False)
            else:
                self._bar.total += n
                self._bar.refresh()

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)

    def tick(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def finite(x: float) -> float | None:
    """JSON-safe float (NaN/inf -> None)."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
