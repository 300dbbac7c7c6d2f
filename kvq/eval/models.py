"""Load the model to evaluate: the embedded default, a local directory or GGUF file, or a hub id.

The default (``smollm2``) is SmolLM2-135M-Instruct from :mod:`kvq.eval.assets`. Its GGUF weights are
dequantized once (~20 s) and saved as safetensors under the kvq cache dir, so later runs load in
well under a second. Every failure becomes an :class:`~kvq.eval.errors.EvalError`, including a
checkpoint that lacks weights (transformers would initialise them randomly).
"""

from __future__ import annotations

import os
from pathlib import Path

from kvq.eval import assets
from kvq.eval.errors import EvalError

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_dir() -> Path:
    """Directory of the default model as fp32 safetensors, converted from the GGUF on first use."""
    out = assets.clean_staging() / "models" / DEFAULT_MODEL_NAME  # staging of killed runs goes
    if assets.verified(out):  # manifest of sha256/size/mtime per file, see kvq.eval.assets
        return out
    assets.claim(out)  # a folder kvq did not write is never replaced
    gguf = assets.model_gguf()
    assets.log(f"kvq: converting {gguf.name} to safetensors in {out} (first use only, ~20 s)")
    model, tokenizer = _from_pretrained(str(gguf.parent), {"gguf_file": gguf.name}, "float32")
    model.hf_quantizer = None  # transformers 5.x refuses to save a model that still has one
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with assets._staging(out.parent) as tmp:
        model.save_pretrained(tmp / "m")
        tokenizer.save_pretrained(tmp / "m")
        assets.write_manifest(tmp / "m")
        assets._swap(tmp / "m", out)
    return out


def resolve(model: str | None) -> tuple[str, dict]:
    """``(pretrained, extra from_pretrained kwargs)`` for a model name, path or hub id."""
    if model in (None, "", DEFAULT_MODEL):
        return str(default_model_dir()), {}
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return str(path), {"gguf_file": ggufs[0].name}
        if not (path / "config.json").exists():
            raise EvalError(
                f"model directory {model} has no config.json (and not exactly one .gguf file)"
            )
        return str(path), {}
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise EvalError(
            f"model path {model!r} does not exist (or is not a model directory/.gguf file); "
            f"use a local directory, a .gguf file, a hub id, or {DEFAULT_MODEL!r}"
        )
    return model, {}


def load(model: str | None = None, dtype: str = "float32"):
    """``(model, tokenizer)`` in eval mode; ``model`` as accepted by :func:`resolve`."""
    pretrained, extra = resolve(model)
    return _from_pretrained(pretrained, extra, dtype, shown=model or DEFAULT_MODEL)


def _from_pretrained(pretrained: str, extra: dict, dtype: str, shown: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained, **extra)
        model, info = AutoModelForCausalLM.from_pretrained(
            pretrained, dtype=getattr(torch, dtype), output_loading_info=True, **extra
        )
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (
            " (offline: HF_HUB_OFFLINE is set and it is not cached)"
            if os.environ.get("HF_HUB_OFFLINE")
            else ""
        )
        raise EvalError(f"cannot load model {shown or pretrained!r}{hint}: {first}") from None
    _check_complete(shown or pretrained, pretrained, info)
    return model.eval(), tokenizer


def _check_complete(shown: str, pretrained: str, info: dict) -> None:
    """Refuse a checkpoint that lacks weights: transformers loads it anyway, with the missing
    ones randomly initialised (e.g. a ``model.safetensors`` overwritten by another file)."""
    from kvq.errors import shorten

    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise EvalError(
            f"model {shorten(shown)}: the checkpoint in {shorten(pretrained)} lacks "
            f"{len(missing)} weight(s) (e.g. {shorten(missing[0])}); transformers would fill "
            "them with random values. Its weight files are incomplete or were overwritten "
            "(by a kvq calibrate --out?); restore them (re-download or re-save the model)"
        )
