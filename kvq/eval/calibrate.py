"""``kvq calibrate`` as a Python API: fit a recipe's ``nuq`` codebooks per layer and K/V.

>>> from kvq.eval.calibrate import calibrate
>>> cfg = calibrate("kvquant3", "out/kvquant3.yaml")          # doctest: +SKIP
>>> cache = kvq.hf.KVQCache(cfg, model.config)                 # doctest: +SKIP

Runs the model over calibration text (default ``shakespeare:calib``, the training split; the
evaluation split is refused), captures every layer's K/V with an identity cache
(:mod:`kvq.eval.capture`), optionally their Fisher sensitivity, fits the levels with
:class:`kvq.calibration.LevelFit` on the cache's blocks, and writes ONE artifact: ``NAME.yaml``
(a KVConfig with per-layer overrides) next to ``NAME.safetensors`` (the levels), which the YAML
references by relative path. ``kvq.load("NAME.yaml")`` and ``kvq compare --pipelines NAME.yaml``
use it. Keys are captured after RoPE, as :class:`kvq.hf.KVQCache` quantizes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from kvq.errors import KVQError

SENSITIVITY = ("fisher", "none")


@dataclass
class CalibrationSettings:
    """What a calibration depends on (recorded in the artifact's metadata)."""

    recipe: str = "kvquant3"
    keys: str | None = None  # recipe spec for keys (overrides the named recipe's)
    values: str | None = None
    model: str | None = None
    corpus: str = "shakespeare:calib"
    tokens: int = 8192
    context: int = 512
    block: int = 32
    sensitivity: str = "fisher"
    device: str | None = None


def recipes(settings: CalibrationSettings) -> tuple[str, str]:
    """(keys recipe, values recipe) specs, from the named recipe and the overrides."""
    from kvq.eval.errors import EvalError
    from kvq.presets import RECIPES

    keys, values = settings.keys, settings.values
    if keys is None or values is None:
        if settings.recipe not in RECIPES:
            raise EvalError(f"unknown recipe {settings.recipe[:80]!r}; known: "
                            f"{', '.join(RECIPES)} (or give --keys and --values specs ending "
                            "in nuq(b))")
        k, v = RECIPES[settings.recipe]
        keys, values = keys or k, values or v
    return keys, values


def capture_corpus(settings: CalibrationSettings, loaded=None, progress: bool = True):
    """(model, [Captured per window]) for the settings' model, corpus, tokens and context: reuse
    it to fit several recipes on the same K/V (``calibrate(..., captured=...)``)."""
    from kvq.eval import corpus as corpora
    from kvq.eval import models
    from kvq.eval.capture import capture
    from kvq.eval.compare import _device, _Progress

    _check(settings)
    model, tokenizer = loaded or models.load(settings.model)
    model.to(_device(settings.device))
    ids = corpora.token_ids(tokenizer, corpora.load_documents(settings.corpus))
    wins = corpora.windows(ids, [settings.context], settings.tokens)[settings.context]
    bar = _Progress(progress)
    bar.total(len(wins))
    bar.describe(f"capturing K/V ({settings.sensitivity})")
    out = []
    for w in wins.to(model.device):
        out.append(capture(model, w[None], sensitivity=settings.sensitivity == "fisher"))
        bar.tick()
    bar.close()
    return model, out


def calibrate(recipe: str | CalibrationSettings = "kvquant3", out: str | Path = "calibrated.yaml",
              progress: bool = True, loaded=None, captured=None, **options):
    """Fit, write ``out`` (.yaml) and ``out`` with suffix .safetensors; return the KVConfig.

    ``recipe``: a recipe name (``kvquant2/3/4``, see :data:`kvq.presets.RECIPES`) or settings;
    ``options``: :class:`CalibrationSettings` fields; ``loaded``: a (model, tokenizer) to reuse;
    ``captured``: the result of :func:`capture_corpus` for the same settings, to skip the model.
    """
    import torch

    import kvq
    from kvq import codebooks
    from kvq.calibration import LevelFit, recipe_bits, with_source
    from kvq.eval import models
    from kvq.eval.caches import geometry
    from kvq.eval.compare import _Progress
    from kvq.eval.errors import EvalError

    s = recipe if isinstance(recipe, CalibrationSettings) else \
        CalibrationSettings(recipe=recipe, **options)
    _check(s)
    out = Path(out)
    if out.suffix not in (".yaml", ".yml"):
        raise EvalError(f"--out {str(out)[:200]!r} must end in .yaml (the safetensors file is "
                        "written next to it)")
    keys_recipe, values_recipe = recipes(s)
    roles = {"k": keys_recipe, "v": values_recipe}
    fitted = {r: spec for r, spec in roles.items() if "nuq(" in spec}
    if not fitted:
        raise EvalError("neither the keys nor the values recipe has a nuq(b) step: nothing to "
                        "calibrate")
    try:
        for spec in fitted.values():
            recipe_bits(spec)
        for spec in set(roles.values()) - set(fitted.values()):
            kvq.build(spec)
    except KVQError as err:
        raise EvalError(f"recipe: {err}") from None

    model, caps = captured or capture_corpus(s, loaded, progress)
    layers, kv_heads, head_dim = geometry(model.config)
    fits = {(i, r): LevelFit(spec) for i in range(layers) for r, spec in fitted.items()}
    bar = _Progress(progress)
    bar.total(len(caps))
    bar.describe(f"fitting {s.recipe}")
    for cap in caps:
        for i in range(layers):
            for r in fitted:
                x = (cap.keys if r == "k" else cap.values)[i]
                f = cap.key_fisher if r == "k" else cap.value_fisher
                fits[i, r].add(x, None if f is None else f[i], block=s.block)
        bar.tick()
    bar.close()

    tensors = {}
    for (i, r), fit in fits.items():
        tensors[f"L{i}.{r}"] = fit.fit()
        if fit.static:
            tensors[f"L{i}.{r}.zero"], tensors[f"L{i}.{r}.scale"] = fit.zero, fit.scale
    tokens = sum(c.keys[0].shape[0] * c.keys[0].shape[2] for c in caps)
    st_path = out.with_suffix(".safetensors")
    codebooks.write(st_path, tensors, {
        "model": s.model or models.DEFAULT_MODEL_NAME, "num_layers": layers,
        "kv_heads": kv_heads, "head_dim": head_dim,
        "keys_recipe": keys_recipe, "values_recipe": values_recipe,
        **{k: v for k, v in asdict(s).items() if k not in ("keys", "values") and v is not None},
        "tokens_used": tokens, "keys_rope": "post",
        "torch": torch.__version__})

    def spec(i: int, r: str) -> str:
        return with_source(roles[r], f"{st_path.name}#L{i}.{r}") if r in fitted else roles[r]

    data = {"name": f"{s.recipe}-calibrated" if s.keys is None and s.values is None
            else "calibrated",
            "keys": spec(0, "k"), "values": spec(0, "v"),
            "layers": {i: {"keys": spec(i, "k"), "values": spec(i, "v")}
                       for i in range(1, layers)}}
    import yaml

    header = (f"# kvq calibrate: {s.recipe} fitted on {s.corpus} ({tokens} tokens, "
              f"{s.context}-token windows, blocks of {s.block}, sensitivity {s.sensitivity})\n"
              f"# for {s.model or models.DEFAULT_MODEL_NAME} ({layers} layers, head_dim "
              f"{head_dim}); levels in {st_path.name} (keys after RoPE)\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(data, sort_keys=False))
    cfg = kvq.load(out)
    cfg.check(num_layers=layers, head_dim=head_dim)
    return cfg


def _check(s: CalibrationSettings) -> None:
    from kvq.eval.errors import EvalError

    if s.corpus in ("shakespeare", "shakespeare:eval"):
        raise EvalError(f"--corpus {s.corpus!r} is the evaluation split; calibrating on it would "
                        "fit the codebooks to the text they are scored on. Use shakespeare:calib "
                        "(the default) or your own text")
    if s.sensitivity not in SENSITIVITY:
        raise EvalError(f"--sensitivity {s.sensitivity!r}: use one of {', '.join(SENSITIVITY)}")
    for name in ("tokens", "context", "block"):
        if getattr(s, name) < 1:
            raise EvalError(f"--{name} must be positive, got {getattr(s, name)}")
    if s.context < s.block:
        raise EvalError(f"--context {s.context} is shorter than one --block of {s.block} tokens")
