"""KVQCache: a transformers ``Cache`` that stores K/V quantized by kvq pipelines.

>>> cache = KVQCache.from_spec("nsep>pchan>int4", model.config)          # doctest: +SKIP
>>> out = model.generate(ids, cache=cache, max_new_tokens=64)             # doctest: +SKIP
>>> print(cache.memory_report())                                         # doctest: +SKIP
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any

import torch
from transformers.cache_utils import Cache

from kvq.errors import KVQError
from kvq.hf.decode import attach_fast_decode
from kvq.hf.geometry import KVGeometry, kv_geometry
from kvq.hf.layer import KVQLayer, PrefillMode
from kvq.hf.memory import MemoryReport, memory_report
from kvq.hf.rope import RopeTracker, rope_adapter
from kvq.kvconfig import KVConfig
from kvq.loading import build, kv


class KVQCache(Cache):
    """Quantize-on-write KV cache for any transformers decoder with standard attention.

    Args:
        config: the K/V configuration: a :class:`kvq.KVConfig`, spec string
            (``"nsep>pchan>int4"``), preset name (``"kivi4"``), YAML/JSON path or dict. Per-layer
            overrides apply (``cfg.for_layer(i)``).
        model_config: the model's ``config`` (gives layers, head_dim, layer types), or the model
            itself: the cache then attaches to it (:meth:`attach`), which pre-RoPE keys need.
        keys, values: spec strings replacing the keys / values pipelines of ``config`` (either
            may be given alone, or both without ``config``).
        prefill: ``"quantized"`` (default): the prefill forward's attention sees dequantized K/V
            and every prompt token is quantized; ``"exact"``: it sees exact K/V, as HF's
            ``QuantizedCache``. See :class:`~kvq.hf.layer.KVQLayer`.
        residual: newest tokens kept exact (default 128).
        block: tokens per quantized block (default 32): token-axis statistics are taken per
            block; a multiple of every pipeline's ``token_block``.
        backend: kvq backend for quantize/dequantize (``"auto"``, ``"torch"``, ``"triton"``).
        keep_dequantized: keep a dequantized copy of the blocks for fast decode (costs memory,
            reported by :meth:`memory_report`).
        sinks: keep the first ``sinks`` real tokens of every sequence exact (default: the
            config's ``sinks``, 0 unless set). With left padding the cache must know the padding
            mask (attach it to the model, or :meth:`set_padding`).
        attention: how decode steps read the blocks. ``"auto"``: attention reads the packed
            blocks directly when the model attends with ``"kvq"``
            (:func:`kvq.hf.enable_fast_attention`) and both pipelines are covered
            (:func:`kvq.hf.coverage.fast_path_reason`), else ``update`` dequantizes them;
            ``"fast"``: the same, but raise when it cannot be used; ``"dequantize"``: never.
        factors: for fast decode with ``nsep`` (renorm): ``"recompute"`` (default) stores
            nothing extra and takes one norm per token per step; ``"store"`` keeps each block's
            per-token factor ``norm / ||direction||`` in fp32 beside it, computed once when the
            block is written (+8 bytes per token and KV head, K and V: +0.031x an fp16 cache),
            for ~10% faster decode on CPU (docs/decode-attention.md).

    Keys are quantized before the rotary embedding on layers whose config says
    ``keys: {rope: pre, ...}`` (``cfg.key_rope_for(i)``); that needs the model (pass it instead of
    its config, or call :meth:`attach`). See docs/pre-rope-and-sinks.md.
    """

    def __init__(self, config: Any = None, model_config=None, *, keys: Any = None,
                 values: Any = None, prefill: PrefillMode = "quantized", residual: int = 128,
                 block: int = 32, backend: str = "auto", keep_dequantized: bool = False,
                 sinks: int | None = None, attention: str = "auto", factors: str = "recompute"):
        model = model_config if isinstance(model_config, torch.nn.Module) else None
        if model is not None:
            model_config = model.config
        cfg = _kv_config(config, keys, values)
        if sinks is not None:
            if type(sinks) is not int or sinks < 0:  # a bool is not a token count
                from kvq.errors import shorten

                raise KVQError(f"sinks={shorten(sinks)}: expected a number of tokens >= 0")
            cfg = cfg.model_copy(update={"sinks": sinks})
        geom = kv_geometry(model_config)
        cfg.check(num_layers=geom.num_layers, head_dim=geom.head_dim, kv_heads=geom.kv_heads)
        _check_options(cfg, geom, prefill, residual, block, backend, keep_dequantized,
                       _context(model_config))
        self.kv_config, self.geometry = cfg, geom
        self.rope = RopeTracker(rope_adapter(model_config)) if cfg.uses_pre_rope else None
        ropes = (self.rope.for_layers(model_config) if self.rope is not None
                 else [None] * geom.num_layers)
        self.options = dict(prefill=prefill, residual=residual, block=block, backend=backend,
                            keep_dequantized=keep_dequantized, sinks=cfg.sinks)
        # a layer the model does not rotate (Cohere2's full layers) gets its keys pre-RoPE as is
        layers = [KVQLayer(*cfg.for_layer(i, geom.num_layers), layer_idx=i,
                           sliding_window=geom.sliding_windows[i],
                           rope=ropes[i] if cfg.key_rope_for(i) == "pre" else None,
                           **self.options) for i in range(geom.num_layers)]
        self.options.update(attention=attention, factors=factors)
        attach_fast_decode(layers, model_config, attention, factors)
        super().__init__(layers=layers)
        self._hooks: list = []
        if model is not None:
            self.attach(model)

    @classmethod
    def from_spec(cls, spec: Any, model_config, **options) -> KVQCache:
        """Same as ``KVQCache(spec, model_config, **options)``."""
        return cls(spec, model_config, **options)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"KVQCache({self.kv_config.label!r}, layers={len(self.layers)}, {opts})"

    # the model ------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> KVQCache:
        """Follow ``model``'s forwards that use this cache: read the rotation positions from its
        rotary embedding (pre-RoPE keys) and the 2D ``attention_mask`` of each ``model(...)``
        call given this cache (as ``generate`` makes them) for :meth:`set_padding`. Hooks only,
        removed by :meth:`detach` or when the cache is garbage collected. Returns the cache."""
        self.detach()
        if self.rope is not None:
            self.rope.attach(model)
        ref = weakref.ref(self)

        def hook(_module, _args, kwargs):
            cache = ref()
            if cache is None:
                return
            if kwargs.get("past_key_values", kwargs.get("cache")) is not cache:
                return
            mask = kwargs.get("attention_mask")
            if torch.is_tensor(mask) and mask.dim() == 2:
                cache.set_padding(mask)

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        weakref.finalize(self, handle.remove)
        self._hooks = [handle]
        return self

    def detach(self) -> None:
        """Remove the hooks of :meth:`attach` (pre-RoPE keys then fail on the next write)."""
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = []
        if self.rope is not None:
            self.rope.detach()

    # shared per-cache state: the rotary positions table follows batch ops and crops --------------
    def reset(self) -> None:
        super().reset()
        if self.rope is not None:
            self.rope.reset()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.rope is not None:
            self.rope.crop(self.get_seq_length())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.rope is not None:
            self.rope.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.rope is not None:
            self.rope.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.rope is not None:
            self.rope.map_batch(
                lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices])

    # padding ----------------------------------------------------------------------------------
    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Tell the cache which positions are padding: ``attention_mask`` (batch, N), 1 = token,
        0 = pad, for positions 0..N-1 (later positions are real tokens). Pad rows are then kept
        out of token-axis statistics. Call it before the forward / ``generate`` that writes those
        positions, or use :meth:`watch`. ``None`` forgets the mask; ``reset()`` too."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise KVQError(f"set_padding expects a 2D (batch, seq) attention mask, got shape "
                           f"{tuple(attention_mask.shape)}")
        for layer in self.layers:
            layer.set_padding(attention_mask)

    @contextmanager
    def watch(self, model: torch.nn.Module):
        """Within the block, read the 2D ``attention_mask`` of every ``model(...)`` call (as made
        by ``generate``) and pass it to :meth:`set_padding`. A forward pre-hook, removed on exit."""

        def hook(_module, _args, kwargs):
            mask = kwargs.get("attention_mask")
            if torch.is_tensor(mask) and mask.dim() == 2:
                self.set_padding(mask)

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    # sizes ----------------------------------------------------------------------------------
    def memory_report(self) -> MemoryReport:
        """Bytes held per layer and in total (quantized blocks with metadata, residual window,
        working copy) vs an fp16 cache of the same tokens; ``print()`` it for a table."""
        return memory_report(self)

    @property
    def nbytes(self) -> int:
        """Total bytes really held by all layers."""
        rope = self.rope.nbytes if self.rope is not None else 0
        return sum(layer.nbytes for layer in self.layers) + rope


def _kv_config(config: Any, keys: Any, values: Any) -> KVConfig:
    if config is None:
        if keys is None or values is None:
            raise KVQError("give a K/V config (spec, preset, path, KVConfig) or both keys= and "
                           "values=")
        return KVConfig(keys=build(keys), values=build(values))
    cfg = kv(config)
    if keys is not None or values is not None:
        cfg = cfg.model_copy(update={k: build(v) for k, v in (("keys", keys), ("values", values))
                                     if v is not None})
    return cfg


#: residual + block when the model config does not give its context length
MAX_WINDOW = 1 << 20


def _context(model_config) -> int | None:
    cfg = model_config.get_text_config(decoder=True)
    n = getattr(cfg, "max_position_embeddings", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _check_options(cfg: KVConfig, geom: KVGeometry, prefill: str, residual: int,
                   block: int, backend: str = "auto", keep_dequantized: bool = False,
                   context: int | None = None) -> None:
    """Types and ranges of the cache options. Decode tokens leave the exact window once it
    holds ``residual + block`` tokens, so that sum must fit the model's context
    (``max_position_embeddings``; :data:`MAX_WINDOW` if unknown): otherwise nothing would
    ever be quantized after the prefill and the cache would silently stay exact. ``sinks``
    must fit the same bound."""
    from kvq.errors import shorten
    from kvq.registry import BACKENDS

    if prefill not in ("quantized", "exact"):
        raise KVQError(f"prefill={shorten(prefill)}: use 'quantized' (prefill attention sees the "
                       "dequantized K/V) or 'exact' (it sees the exact K/V)")
    if type(residual) is not int or residual < 0:
        raise KVQError(f"residual={shorten(residual)}: expected a number of tokens >= 0")
    if type(block) is not int or block < 1:
        raise KVQError(f"block={shorten(block)}: expected a number of tokens >= 1")
    if type(keep_dequantized) is not bool:
        raise KVQError(f"keep_dequantized={shorten(keep_dequantized)}: expected True or False")
    if backend != "auto" and backend not in BACKENDS:
        raise KVQError(f"backend={shorten(backend)}: expected 'auto' or one of "
                       f"{BACKENDS.names()}")
    limit = context or MAX_WINDOW
    if residual + block > limit:
        what = f"the model's context ({limit} tokens)" if context else f"{limit} tokens"
        raise KVQError(f"residual={residual} + block={block} exceeds {what}: the exact window "
                       "would never fill, so decode tokens would never be quantized; use a "
                       "smaller residual or block (defaults: residual=128, block=32)")
    if cfg.sinks > limit:
        what = f"the model's context ({limit} tokens)" if context else f"{limit} tokens"
        raise KVQError(f"sinks={cfg.sinks} exceeds {what}: a sequence never has that many "
                       "tokens; use fewer sinks (e.g. sinks=4)")
    for i in range(geom.num_layers):
        for role, p in zip(("keys", "values"), cfg.for_layer(i, geom.num_layers)):
            tb = p.token_block
            if tb and block % tb:
                raise KVQError(f"block={block} is not a multiple of the token group {tb} of the "
                               f"{role} pipeline {p.to_spec()!r} (layer {i}); use "
                               f"block={tb * max(1, block // tb)}")
            if p.token_axis_stats and block < 2:
                raise KVQError(f"block={block}: the {role} pipeline {p.to_spec()!r} takes "
                               "statistics over tokens, so blocks need at least 2 tokens")
