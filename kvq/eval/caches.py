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
    """Bytes of ``tokens`` tokens of K and V over all layers at 2 bytes per element."""
    layers, kv_heads, head_dim = geometry(model_config)
    return 2 * layers * kv_heads * head_dim * tokens * 2
