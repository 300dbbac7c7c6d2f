"""The ``"kvq"`` attention implementation for transformers: decode steps read packed K/V.

>>> import kvq.hf                                                     # doctest: +SKIP
>>> kvq.hf.enable_fast_attention(model)        # registers "kvq", model.set_attn_implementation
>>> cache = kvq.hf.KVQCache("nsep>pchan>int4", model.config)           # doctest: +SKIP
>>> model.generate(ids, **kvq.hf.cache_kwargs(model, cache))           # doctest: +SKIP

:func:`kvq_attention` is what transformers calls as
``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)`` with the
``key``/``value`` that ``cache.update`` returned. A key tagged with a
:class:`~kvq.hf.decode.DecodeView` (a ``KVQCache`` decode step) is attended by
:func:`kvq.hf.flash_decode.decode_attention` (torch) or, for CUDA tensors with Triton installed,
the split-K kernel of :mod:`kvq.backends.triton.decode_attention`; anything else (prefill, other
caches, a request the fast path does not serve) goes to transformers' own SDPA function, over the
dequantized K/V when needed. Masks are SDPA's (registered under the same name).
"""

from __future__ import annotations

import torch

from kvq.hf.decode import TAG

NAME = "kvq"


def kvq_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  **kwargs):
    """transformers attention function; returns (output (B, q, heads, Dv), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    view = getattr(key, TAG, None)
    if view is not None and not _fast_ok(query, dropout, kwargs):
        key, value = view.materialize()
        view.done()
        view = None
    if view is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    with torch.no_grad():
        out = _decode(query, view, (key, value), attention_mask, scale)
    view.done()
    return out.transpose(1, 2).contiguous(), None


def _fast_ok(query, dropout, kwargs) -> bool:
    """Inference on one query with plain softmax: no gradient, dropout, softcap, sinks or
    returned weights."""
    extra = ("softcap", "s_aux", "sinks", "position_bias")
    if torch.is_grad_enabled() and query.requires_grad:
        return False  # training / autograd: the general path keeps the graph
    return (query.shape[2] == 1 and not dropout and not kwargs.get("output_attentions")
            and all(kwargs.get(k) is None for k in extra))


def _decode(query, view, window, mask, scale):
    if query.is_cuda and view.layer.k_store.segments:
        from kvq.hf.triton_decode import triton_decode_supported

        if triton_decode_supported(view):
            from kvq.hf.triton_decode import triton_decode_attention

            return triton_decode_attention(query, view, window, mask, scale)
    from kvq.hf.flash_decode import decode_attention

    return decode_attention(query, view, window, mask, scale)


def register() -> None:
    """Register ``"kvq"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, kvq_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def enable_fast_attention(model) -> None:
    """Register ``"kvq"`` and switch ``model`` to it; a ``KVQCache`` built from ``model.config``
    then serves decode steps from its packed blocks (other caches attend as with SDPA)."""
    register()
    model.set_attn_implementation(NAME)
