"""The one place where evaluation builds K/V caches and reads a model's K/V geometry."""

from __future__ import annotations

from kvq.kvconfig import KVConfig


def make_cache(cfg: KVConfig, model, prefill: str = "quantized", **options):
    """A fresh :class:`kvq.hf.KVQCache` for one forward or one ``generate`` call, attached to
    ``model`` (pre-RoPE keys read its rotary embedding, sinks its padding mask)."""
    from kvq.hf import KVQCache

    return KVQCache(cfg, model, prefill=prefill, **options)


def geometry(model_config) -> tuple[int, int, int]:
    """``(num_layers, kv_heads, head_dim)`` of a transformers model config."""
    from kvq.hf.geometry import kv_geometry

    g = kv_geometry(model_config)
    return g.num_layers, g.kv_heads, g.head_dim


def max_context(model_config) -> int | None:
    """The model's maximum number of positions (``max_position_embeddings``, ``n_positions`` or
    ``n_ctx`` of its text config), None when it names none."""
    text = model_config.get_text_config(decoder=True)
    return next((getattr(text, a) for a in ("max_position_embeddings", "n_positions", "n_ctx")
                 if isinstance(getattr(text, a, None), int)), None)


def check_context(model_config, asked: int, option: str = "--context") -> None:
    """The one rule of every command: a window of ``asked`` tokens must fit the model's
    maximum (:func:`max_context`); otherwise an :class:`~kvq.eval.errors.EvalError`."""
    from kvq.eval.errors import EvalError

    limit = max_context(model_config)
    if limit is not None and asked > limit:
        raise EvalError(f"context {asked} is longer than the model's maximum of {limit} tokens; "
                        f"use {option} of at most {limit}")


def is_identity(cfg: KVConfig) -> bool:
    """True when no pipeline of ``cfg`` quantizes (the ``fp16`` reference)."""
    return all(p.is_identity for p in cfg.pipelines())


def fp16_bytes(model_config, tokens: int) -> int:
    """Bytes transformers' ``DynamicCache(config=...)`` holds after ``tokens`` tokens, at 2 bytes
    per K and V element: every token of a full-attention layer, the newest
    ``sliding_window - 1`` of a sliding-window layer (as ``DynamicSlidingWindowLayer``)."""
    from kvq.hf.geometry import kv_geometry

    g = kv_geometry(model_config)
    held = sum(tokens if w is None else min(tokens, w - 1) for w in g.sliding_windows)
    return 2 * g.kv_heads * g.head_dim * held * 2
