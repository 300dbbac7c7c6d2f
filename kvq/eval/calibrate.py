"""``kvq calibrate`` as a Python API: fit a recipe's ``nuq`` codebooks per layer and K/V.

>>> from kvq.eval.calibrate import calibrate
>>> cfg = calibrate("kvquant3", "out/kvquant3.yaml")          # doctest: +SKIP
>>> cache = kvq.hf.KVQCache(cfg, model.config)                 # doctest: +SKIP

Runs the model over calibration text (default ``mixed:calib``: the calib splits of the three
shipped domains in equal shares, so a fit holds across domains; an evaluation split is
refused), captures every layer's K/V with an identity cache
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
from kvq.eval import artifact

SENSITIVITY = ("fisher", "none")


@dataclass
class CalibrationSettings:
    """What a calibration depends on (recorded in the artifact's metadata)."""

    recipe: str = "kvquant3"
    keys: str | None = None  # recipe spec for keys (overrides the named recipe's)
    values: str | None = None
    model: str | None = None
    corpus: str = "mixed:calib"  # Shakespeare, prose and code in equal shares (docs/evaluation.md)
    tokens: int = 8192
    context: int = 512
    block: int = 32
    sensitivity: str = "fisher"
    levels: str = "kmeans"  # or "uniform" (ablation: no non-uniform levels)
    key_rope: str | None = None  # "pre" / "post" (default: the recipe's, else post)
    sinks: int | None = None  # first tokens kept exact (default: the recipe's, else 0)
    bits: float | None = None  # klt>alloc recipes: mean stored bits/element, alloc(2|3|4) chosen
    allocate: str = "predicted"  # or "measured": --bits costs from measured KL per layer and width
    measure_windows: int = 4  # calibration windows the measured allocation runs
    device: str | None = None
    force: bool = False  # overwrite files that kvq did not write (and files in the model folder)


def resolve_recipe(settings: CalibrationSettings) -> dict:
    """``{keys, values, key_rope, sinks}``: the named recipe with the settings' overrides."""
    from kvq.eval.errors import EvalError
    from kvq.presets import RECIPES

    custom = settings.keys is not None and settings.values is not None
    if not custom and settings.recipe not in RECIPES:
        raise EvalError(f"unknown recipe {settings.recipe[:80]!r}; known: {', '.join(RECIPES)} "
                        "(or give --keys and --values specs ending in nuq(b))")
    base = dict(RECIPES.get(settings.recipe, {"key_rope": "post", "sinks": 0}))
    for name in ("keys", "values", "key_rope", "sinks"):
        if getattr(settings, name) is not None:
            base[name] = getattr(settings, name)
    if base["key_rope"] not in ("pre", "post"):
        raise EvalError(f"--key-rope {base['key_rope']!r}: use pre or post")
    sinks = base["sinks"]
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise EvalError(f"--sinks must be an integer >= 0, got {sinks!r}")
    if sinks + settings.block > settings.context:
        raise EvalError(f"--sinks {sinks} leaves no block of {settings.block} tokens in a "
                        f"--context of {settings.context}: use at most "
                        f"{max(settings.context - settings.block, 0)} sinks or a longer context")
    return base


def capture_corpus(settings: CalibrationSettings, loaded=None, progress: bool = True,
                   key_ropes: tuple[str, ...] | None = None):
    """(model, [Captured per window]) for the settings' model, corpus, tokens and context: reuse
    it to fit several recipes on the same K/V (``calibrate(..., captured=...)``); ``key_ropes``
    (default: the recipe's) says which keys to keep, ``("post", "pre")`` for both."""
    from kvq.eval import corpus as corpora
    from kvq.eval import models
    from kvq.eval.caches import check_context
    from kvq.eval.capture import capture
    from kvq.eval.compare import _device, _Progress

    _check(settings)
    key_ropes = key_ropes or (resolve_recipe(settings)["key_rope"],)
    device = _device(settings.device)
    docs = corpora.load_documents(settings.corpus)
    model, tokenizer = loaded or models.load(settings.model)
    check_context(model.config, settings.context)
    model.to(device)
    ids = corpora.token_ids(tokenizer, docs)
    wins = corpora.windows(ids, [settings.context], settings.tokens)[settings.context]
    bar = _Progress(progress)
    bar.total(len(wins))
    bar.describe(f"capturing K/V ({settings.sensitivity})")
    out = []
    for w in wins.to(model.device):
        out.append(capture(model, w[None], sensitivity=settings.sensitivity == "fisher",
                           key_ropes=key_ropes))
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
    import kvq
    from kvq import transform_coding as tc
    from kvq.calibration import recipe_bits
    from kvq.eval.errors import EvalError

    s = recipe if isinstance(recipe, CalibrationSettings) else \
        CalibrationSettings(recipe=recipe, **options)
    _check(s)
    out = Path(out)
    artifact.check_name(out)
    from kvq.static_scales import RECIPES as STATIC_RECIPES

    if s.recipe in STATIC_RECIPES:  # static FP8/NVFP4 scales (kvq export)
        from kvq.eval.static_calibrate import calibrate_static

        created = artifact.prepare(out, s.model, s.force)
        try:
            return calibrate_static(s, out, progress, loaded, captured)
        except BaseException:
            artifact.remove_folders(created)
            raise
    rec = resolve_recipe(s)
    roles = {"k": rec["keys"], "v": rec["values"]}
    fitted = {r: spec for r, spec in roles.items() if "nuq(" in spec or tc.is_recipe(spec)}
    if not fitted:
        raise EvalError("neither the keys nor the values recipe has a nuq(b) or klt>alloc(b) "
                        "step: nothing to calibrate")
    if s.bits is not None and not all(tc.is_recipe(spec) for spec in roles.values()):
        raise EvalError("--bits chooses alloc widths per layer: it needs klt>alloc(b) recipes "
                        "for keys and values (e.g. --recipe tc3)")
    for spec in fitted.values():
        wrong = "uniform" if tc.is_recipe(spec) else "gaussian"
        if s.levels == wrong:
            raise EvalError(f"--levels {wrong} does not apply to {spec[:80]!r}: use kmeans or "
                            f"{'gaussian' if wrong == 'uniform' else 'uniform'}")
    try:
        for spec in fitted.values():
            tc.recipe_bits(spec) if tc.is_recipe(spec) else recipe_bits(spec)
        for spec in set(roles.values()) - set(fitted.values()):
            kvq.build(spec)
    except KVQError as err:
        raise EvalError(f"recipe: {err}") from None

    created = artifact.prepare(out, s.model, s.force)
    try:
        return _run(s, out, rec, roles, fitted, progress, loaded, captured)
    except BaseException:
        artifact.remove_folders(created)
        raise


def _run(s: CalibrationSettings, out: Path, rec: dict, roles: dict, fitted: dict, progress,
         loaded, captured):
    """Capture (or reuse ``captured``), fit, write the artifact, load it back."""
    import hashlib

    import torch

    import kvq
    from kvq import codebooks
    from kvq import transform_coding as tc
    from kvq.calibration import LevelFit, with_source
    from kvq.eval import models
    from kvq.eval.caches import geometry
    from kvq.eval.compare import _Progress
    from kvq.eval.errors import EvalError

    rope, sinks = rec["key_rope"], rec["sinks"]
    keys_recipe, values_recipe = roles["k"], roles["v"]
    model, caps = captured or capture_corpus(s, loaded, progress)
    layers, kv_heads, head_dim = geometry(model.config)

    def fitter(spec):
        if tc.is_recipe(spec):
            return tc.TransformFit(spec, levels=s.levels)
        return LevelFit(spec, levels=s.levels)

    fits = {(i, r): fitter(spec) for i in range(layers) for r, spec in fitted.items()}
    bar = _Progress(progress)
    bar.total(len(caps))
    bar.describe(f"fitting {s.recipe}")
    for cap in caps:
        if rope not in cap.keys:
            raise EvalError(f"the captured K/V hold no {rope}-RoPE keys; capture with "
                            f"key_ropes=({rope!r},)")
        for i in range(layers):
            for r in fitted:
                x = cap.keys[rope][i] if r == "k" else cap.values[i]
                f = cap.key_fisher[rope] if r == "k" and cap.key_fisher else cap.value_fisher
                f = None if s.sensitivity == "none" else f
                x, w = _without_sinks(x, None if f is None else f[i], sinks)
                fits[i, r].add(x, w, block=s.block)
        bar.tick()
    bar.close()

    costs = None
    if s.bits is not None and s.allocate == "measured":
        import tempfile

        from kvq.eval.measured_widths import measured_costs

        windows = [c.ids.to(model.device) for c in caps[: s.measure_windows] if c.ids is not None]
        if not windows:
            raise EvalError("--allocate measured needs the captured token ids; capture again "
                            "with this kvq")
        bar = _Progress(progress)
        bar.total(len(fits) * len(BUDGET_WIDTHS))
        bar.describe("measuring widths")
        with tempfile.TemporaryDirectory() as tmp:
            costs = measured_costs(model, windows, fits, roles, rope, sinks, BUDGET_WIDTHS,
                                   Path(tmp), bar.tick)
        bar.close()
    widths = _budget(fits, s.bits, head_dim, costs) if s.bits is not None else {}
    tensors = {}
    for (i, r), fit in fits.items():
        if isinstance(fit, tc.TransformFit):
            tensors.update({f"L{i}.{r}.{k}": t for k, t in fit.fit(widths.get((i, r))).items()})
            continue
        tensors[f"L{i}.{r}"] = _distinct(fit.fit(), i, r)
        if fit.static:
            tensors[f"L{i}.{r}.zero"], tensors[f"L{i}.{r}.scale"] = fit.zero, fit.scale
    tokens = sum(c.values[0].shape[0] * c.values[0].shape[2] for c in caps)
    st_path = out.with_suffix(".safetensors")
    st_bytes = codebooks.encode(tensors, {
        "model": models.display_name(s.model), "num_layers": layers,
        "kv_heads": kv_heads, "head_dim": head_dim,
        "keys_recipe": keys_recipe, "values_recipe": values_recipe,
        **{k: v for k, v in asdict(s).items() if k not in ("keys", "values") and v is not None},
        "tokens_used": tokens, "key_rope": rope, "sinks": sinks,
        "torch": torch.__version__})
    digest = hashlib.sha256(st_bytes).hexdigest()

    def spec(i: int, r: str) -> str:
        if r not in fitted:
            return roles[r]
        source = f"{st_path.name}#L{i}.{r}"
        if not tc.is_recipe(roles[r]):
            return with_source(roles[r], source, digest)
        return tc.with_source(tc.at_bits(roles[r], widths.get((i, r), fits[i, r].bits)), source,
                              digest)

    data = {"name": out.stem,
            "keys": spec(0, "k") if rope == "post" else {"rope": rope, "pipeline": spec(0, "k")},
            "values": spec(0, "v"), "sinks": sinks,
            "layers": {i: {"keys": spec(i, "k"), "values": spec(i, "v")}
                       for i in range(1, layers)}}
    import yaml

    header = (f"# kvq calibrate: {s.recipe} fitted on {s.corpus} ({tokens} tokens, "
              f"{s.context}-token windows, blocks of {s.block}, sensitivity {s.sensitivity})\n"
              f"# for {models.display_name(s.model)} ({layers} layers, head_dim "
              f"{head_dim}); levels in {st_path.name} (keys {rope}-RoPE, {sinks} sink(s))\n")
    artifact.write(out, header + yaml.safe_dump(data, sort_keys=False), st_bytes)
    cfg = kvq.load(out)
    cfg.check(num_layers=layers, head_dim=head_dim, kv_heads=kv_heads)
    return cfg


def _distinct(levels, layer: int, role: str):
    """``levels`` unless some of them collapsed onto one value (k-means on too few distinct
    samples makes levels a rounding step apart): then the fit is refused."""
    from kvq.eval.errors import EvalError

    gaps = levels[1:] - levels[:-1]
    span = float(levels[-1] - levels[0])
    collapsed = int((gaps <= 1e-5 * max(span, 1e-30)).sum())
    if collapsed:
        raise EvalError(f"the fitted levels of layer {layer} {'keys' if role == 'k' else 'values'}"
                        f" collapse ({levels.numel() - collapsed} distinct of {levels.numel()}):"
                        " the calibration samples take too few values; use more --tokens, "
                        "fewer --sinks or a longer --context")
    return levels


#: the code widths ``kvq calibrate --bits`` chooses from, per layer and K/V
BUDGET_WIDTHS = (2, 3, 4)


def _budget(fits: dict, bits: float, head_dim: int, costs: dict | None = None
            ) -> dict[tuple[int, str], int]:
    """``alloc`` width per (layer, role) minimising the summed predicted distortion (in loss
    units with Fisher sensitivities), or the summed measured ``costs[layer, role, width]``,
    with mean stored bits/element <= ``bits``."""
    from kvq.eval.errors import EvalError
    from kvq.knapsack import choose

    keys = list(fits)
    options = [[(round((b + fits[k].meta_bits_per_element) * head_dim),
                 fits[k].distortion(b) if costs is None else costs[(*k, b)])
                for b in BUDGET_WIDTHS] for k in keys]
    picks = choose(options, int(bits * head_dim * len(keys) + 1e-9))
    if picks is None:
        low = min(BUDGET_WIDTHS) + fits[keys[0]].meta_bits_per_element
        raise EvalError(f"--bits {bits:g} is below the cheapest choice, {low:g} bits/element")
    return {k: BUDGET_WIDTHS[j] for k, j in zip(keys, picks)}


def _without_sinks(x, fisher, sinks: int):
    """Sink tokens are kept exact, so they leave the statistics: like the cache (which fills
    them with a real row of their block) they get the next token's values, and weight 0."""
    import torch

    w = torch.ones_like(x) if fisher is None else fisher.clone()
    if sinks:
        x = x.clone()
        x[:, :, :sinks] = x[:, :, sinks:sinks + 1]
        w[:, :, :sinks] = 0
    return x, w


def _check(s: CalibrationSettings) -> None:
    from kvq.eval.compare import _device
    from kvq.eval.corpus import is_eval_split
    from kvq.eval.errors import EvalError

    _device(s.device)
    if is_eval_split(s.corpus):
        calib = s.corpus.partition(":")[0] + ":calib"
        raise EvalError(f"--corpus {s.corpus!r} is the evaluation split; calibrating on it would "
                        f"fit the codebooks to the text they are scored on. Use {calib} "
                        "(mixed:calib is the default) or your own text")
    if s.bits is not None and not 0 < s.bits <= 16:
        raise EvalError(f"--bits must be positive and at most 16 (bits/element), got {s.bits}")
    if s.allocate not in ("predicted", "measured"):
        raise EvalError(f"--allocate {s.allocate!r}: use predicted or measured")
    if s.allocate == "measured" and s.bits is None:
        raise EvalError("--allocate measured chooses widths under --bits; give --bits B")
    if s.measure_windows < 1:
        raise EvalError(f"--measure-windows must be positive, got {s.measure_windows}")
    if s.levels not in ("kmeans", "uniform", "gaussian"):
        raise EvalError(f"--levels {s.levels!r}: use kmeans, uniform (nuq) or gaussian "
                        "(alloc)")
    if s.sensitivity not in SENSITIVITY:
        raise EvalError(f"--sensitivity {s.sensitivity!r}: use one of {', '.join(SENSITIVITY)}")
    for name in ("tokens", "context", "block"):
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EvalError(f"--{name} must be a positive integer, got {value!r}")
    if s.context < 2:
        raise EvalError(f"--context {s.context}: a window needs at least 2 tokens (the loss "
                        "predicts each next token)")
    if s.context < s.block:
        raise EvalError(f"--context {s.context} is shorter than one --block of {s.block} tokens")
