"""``kvq calibrate --recipe fp8-tensor`` (``fp8-head``, ...): static FP8 KV scales per layer.

Captures every layer's K (after RoPE, as engines quantize them) and V over the calibration
windows, fits one scale per tensor or KV head with :class:`kvq.static_scales.ScaleFit`, and
writes ``NAME.safetensors`` (tensors ``L{i}.k.scale`` / ``L{i}.v.scale``) and ``NAME.yaml``
(``fp8(e4m3,static,source=NAME.safetensors#L{i}.k)`` per layer): what ``kvq compare`` scores is
what vLLM runs with the checkpoint ``kvq export --engine compressed-tensors`` writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path


def calibrate_static(s, out: Path, progress: bool = True, loaded=None, captured=None):
    """Fit the static recipe ``s.recipe`` (settings of :mod:`kvq.eval.calibrate`); -> KVConfig."""
    import torch
    import yaml

    import kvq
    from kvq import codebooks
    from kvq.eval import artifact, models
    from kvq.eval.caches import geometry
    from kvq.eval.calibrate import capture_corpus
    from kvq.eval.errors import EvalError
    from kvq.static_scales import RECIPES, ScaleFit

    recipe = RECIPES[s.recipe]
    if s.keys is not None or s.values is not None or s.bits is not None:
        raise EvalError(f"--recipe {s.recipe} fits static scales: --keys, --values and --bits "
                        "do not apply")
    if s.key_rope not in (None, "post") or s.sinks:
        raise EvalError(f"--recipe {s.recipe}: engines quantize keys after RoPE and keep no "
                        "sinks; drop --key-rope pre / --sinks")
    s = dataclasses.replace(s, sensitivity="none", key_rope="post", sinks=0)
    model, caps = captured or capture_corpus(s, loaded, progress, key_ropes=("post",))
    if not caps:
        raise EvalError("no calibration windows: give more --tokens than one --context")
    layers, kv_heads, head_dim = geometry(model.config)
    fits = {(i, r): ScaleFit(recipe.per, recipe.observer) for i in range(layers) for r in "kv"}
    for cap in caps:
        for i in range(layers):
            fits[i, "k"].add(cap.keys["post"][i])
            fits[i, "v"].add(cap.values[i])
    tensors = {f"L{i}.{r}.scale": fit.scale(recipe.fmax) for (i, r), fit in fits.items()}
    tokens = sum(c.values[0].shape[0] * c.values[0].shape[2] for c in caps)
    st_path = out.with_suffix(".safetensors")
    name = s.model or models.DEFAULT_MODEL_NAME
    st_bytes = codebooks.encode(tensors, {
        "model": name, "num_layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
        "recipe": s.recipe, "per": recipe.per, "observer": recipe.observer,
        "corpus": s.corpus, "context": s.context, "tokens_used": tokens,
        "torch": torch.__version__})
    digest = hashlib.sha256(st_bytes).hexdigest()

    def spec(i: int, r: str) -> str:
        return recipe.spec.format(src=f"{st_path.name}#L{i}.{r},sha256={digest}")

    data = {"name": out.stem, "keys": spec(0, "k"), "values": spec(0, "v"),
            "layers": {i: {"keys": spec(i, "k"), "values": spec(i, "v")}
                       for i in range(1, layers)}}
    header = (f"# kvq calibrate: {s.recipe} ({recipe.doc}) fitted on {s.corpus} ({tokens} "
              f"tokens, {s.context}-token windows, observer {recipe.observer})\n"
              f"# for {name} ({layers} layers, {kv_heads} kv heads); scales in {st_path.name}\n")
    artifact.write(out, header + yaml.safe_dump(data, sort_keys=False), st_bytes)
    cfg = kvq.load(out)
    cfg.check(num_layers=layers, head_dim=head_dim, kv_heads=kv_heads)
    return cfg
