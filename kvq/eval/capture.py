"""Capture every layer's K/V (and their loss sensitivity) in one forward, with no KVQCache.

An identity cache (transformers' ``DynamicCache``) receives the K/V each attention layer writes
and returns them unchanged, so the forward is exactly the fp model's; after it, ``layer.keys`` /
``layer.values`` are the very tensors attention used, (batch, kv_heads, seq, head_dim), keys
after RoPE (or rotated back before it). With ``sensitivity=True`` the language-model loss is
back-propagated and the squared gradient of the loss with respect to every K/V entry is returned
too: the diagonal Fisher information estimate KVQuant weights its k-means with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Captured:
    """One window, per layer: keys by rope (``"post"``, ``"pre"``) and values, each (batch,
    kv_heads, seq, head_dim) fp32, their squared loss gradients (same layout) or None, and the
    token ids (batch, seq) of the window."""

    keys: dict[str, list[torch.Tensor]]
    values: list[torch.Tensor]
    key_fisher: dict[str, list[torch.Tensor]] | None = None
    value_fisher: list[torch.Tensor] | None = None
    ids: torch.Tensor | None = None


def capture(model, ids: torch.Tensor, sensitivity: bool = False,
            key_ropes: tuple[str, ...] = ("post",)) -> Captured:
    """Run ``model`` on ``ids`` (batch, seq) through an identity cache; see the module docs.

    ``key_ropes`` may hold ``"pre"``: keys (and their gradients) rotated back to before the
    rotary embedding with the model's own angles (:class:`kvq.hf.rope.RopeTracker`), as a
    pre-RoPE :class:`~kvq.hf.KVQCache` quantizes them.
    """
    from transformers import DynamicCache

    from kvq.hf.compat import cache_kwargs

    turns = {r: _unrotate(model, r) for r in key_ropes}
    cache = DynamicCache(config=model.config)
    if not sensitivity:
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache), use_cache=True)
        return Captured({r: [f(la.keys.float()) for la in cache.layers] for r, f in turns.items()},
                        [la.values.float() for la in cache.layers], ids=ids)
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, **cache_kwargs(model, cache),
                           use_cache=True).logits
            for la in cache.layers:
                la.keys.retain_grad()
                la.values.retain_grad()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
            loss.backward()
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    # a rotation is orthogonal: the gradient w.r.t. pre-RoPE keys is the gradient rotated back
    return Captured(
        {r: [f(la.keys.detach().float()) for la in cache.layers] for r, f in turns.items()},
        [la.values.detach().float() for la in cache.layers],
        {r: [f(la.keys.grad.float()).pow(2) for la in cache.layers] for r, f in turns.items()},
        [la.values.grad.float().pow(2) for la in cache.layers], ids=ids)


def _unrotate(model, key_rope: str):
    """A function: post-RoPE keys (B, H, T, D) at positions 0..T-1 -> keys as quantized."""
    if key_rope == "post":
        return lambda k: k
    from kvq.hf.rope import RopeTracker, rope_adapter

    tracker = RopeTracker(rope_adapter(model.config))
    tracker.attach(model)
    tracker.detach()  # only its rotary module is needed: positions are 0..T-1

    def unrotate(k: torch.Tensor) -> torch.Tensor:
        tracker.positions = torch.arange(k.shape[-2], dtype=torch.int32)[None]
        return tracker.unrotate(k, 0)

    return unrotate
