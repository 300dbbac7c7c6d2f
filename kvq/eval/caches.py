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
