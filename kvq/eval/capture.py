"""Capture every layer's K/V (and their loss sensitivity) in one forward, with no KVQCache.

An identity cache (transformers' ``DynamicCache``) receives the K/V each attention layer writes
and returns them unchanged, so the forward is exactly the fp model's; after it, ``layer.keys`` /
``layer.values`` are the very tensors attention used, (batch, kv_heads, seq, head_dim), keys
after RoPE. With ``sensitivity=True`` the language-model loss is back-propagated and the squared
gradient of the loss with respect to every K/V entry is returned too: the diagonal Fisher
information estimate KVQuant weights its k-means with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Captured:
    """One window: per layer, K and V (batch, kv_heads, seq, head_dim) fp32, and their squared
    loss gradients (same shapes) or None."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_fisher: list[torch.Tensor] | None = None
    value_fisher: list[torch.Tensor] | None = None


def capture(model, ids: torch.Tensor, sensitivity: bool = False) -> Captured:
    """Run ``model`` on ``ids`` (batch, seq) through an identity cache; see the module docs."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if not sensitivity:
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
        return Captured([la.keys.float() for la in cache.layers],
                        [la.values.float() for la in cache.layers])
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, past_key_values=cache, use_cache=True).logits
            for la in cache.layers:
                la.keys.retain_grad()
                la.values.retain_grad()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
            loss.backward()
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    return Captured([la.keys.detach().float() for la in cache.layers],
                    [la.values.detach().float() for la in cache.layers],
                    [la.keys.grad.float().pow(2) for la in cache.layers],
                    [la.values.grad.float().pow(2) for la in cache.layers])
