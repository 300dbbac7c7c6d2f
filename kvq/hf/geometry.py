"""KV geometry of a transformers model config: layers, KV heads, head_dim, layer types."""

from __future__ import annotations

from dataclasses import dataclass

from kvq.errors import KVQError

#: Layer types a :class:`~kvq.hf.KVQCache` can hold. Sliding-window layers hold and show attention
#: the same window as transformers' ``DynamicSlidingWindowLayer`` (docs/hf-cache.md).
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class KVGeometry:
    """What a KV cache for ``model_config`` stores per layer: (batch, kv_heads, seq, head_dim)."""

    num_layers: int
    head_dim: int
    kv_heads: int
    layer_types: tuple[str, ...]
    model_type: str
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None for full attention


def kv_geometry(model_config) -> KVGeometry:
    """Read the KV geometry from a transformers ``PreTrainedConfig`` (decoder text config).

    Raises :class:`kvq.KVQError` for models without a standard attention KV cache (Mamba, RWKV,
    encoder-only...) or with layer types kvq cannot hold (chunked, linear or compressed attention).
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    if model_config is None or not hasattr(model_config, "get_text_config"):
        raise KVQError(f"expected a transformers model config (model.config), got "
                       f"{type(model_config).__name__}")
    cfg = model_config.get_text_config(decoder=True)
    mtype = getattr(cfg, "model_type", type(cfg).__name__)
    heads = getattr(cfg, "num_attention_heads", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    if not heads or not layers:
        raise KVQError(f"model type {mtype!r} has no standard attention KV cache "
                       f"(num_attention_heads={heads}, num_hidden_layers={layers}); "
                       "KVQCache only holds (batch, kv_heads, seq, head_dim) attention K/V")
    try:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(cfg)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds here
        raise KVQError(f"cannot read the layer types of model type {mtype!r}: {err}") from None
    bad = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if bad:
        raise KVQError(f"model type {mtype!r} has layer types {bad} that KVQCache cannot hold "
                       f"(supported: {list(SUPPORTED_LAYER_TYPES)}); e.g. Mamba/linear-attention "
                       "layers keep a recurrent state, not a K/V cache")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        kv_heads = 1  # Falcon multi-query
    if getattr(cfg, "kv_lora_rank", None):  # MLA (DeepSeek-V2/V3): one latent "head" is cached,
        kv_heads, head_dim = 1, cfg.kv_lora_rank  # keys = the latent, values = the rope part
    windows = tuple(kw.get("sliding_window") if t == "sliding_attention" else None
                    for t, kw in zip(layer_types, layer_kwargs))
    return KVGeometry(int(layers), int(head_dim), int(kv_heads), tuple(layer_types), mtype,
                      windows)
