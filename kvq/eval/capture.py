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
    # no config: every layer is a plain DynamicLayer that holds and returns all tokens, so the
    # captured tensors are those attention used (a sliding-window layer stores only a slice of
    # them, outside the autograd graph: no gradient, and too few tokens)
    cache = DynamicCache()
    if not sensitivity:
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache), use_cache=True)
        return Captured({r: [f(la.keys.float(), i) for i, la in enumerate(cache.layers)]
                         for r, f in turns.items()},
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
        {r: [f(la.keys.detach().float(), i) for i, la in enumerate(cache.layers)]
         for r, f in turns.items()},
        [la.values.detach().float() for la in cache.layers],
        {r: [f(_grad(la.keys, i, "keys"), i).pow(2) for i, la in enumerate(cache.layers)]
         for r, f in turns.items()},
        [_grad(la.values, i, "values").pow(2) for i, la in enumerate(cache.layers)], ids=ids)


def _grad(t: torch.Tensor, layer: int, what: str) -> torch.Tensor:
    """The loss gradient of a captured tensor, fp32; an error naming the layer if it has none."""
    if t.grad is None:
        from kvq.eval.errors import EvalError

        raise EvalError(f"layer {layer}'s cached {what} got no loss gradient: the model does not "
                        "use the tensor it wrote to the cache; use sensitivity='none' for it")
    return t.grad.float()


def _unrotate(model, key_rope: str):
    """A function: layer i's post-RoPE keys (B, H, T, D) at positions 0..T-1 -> keys as
    quantized (unchanged on layers the model does not rotate)."""
    if key_rope == "post":
        return lambda k, i: k
    from kvq.hf.rope import RopeTracker, rope_adapter

    tracker = RopeTracker(rope_adapter(model.config))
    tracker.bind(model)  # only its rotary module is needed: positions are 0..T-1
    layers = tracker.for_layers(model.config)

    def unrotate(k: torch.Tensor, i: int) -> torch.Tensor:
        if layers[i] is None:
            return k
        tracker.positions = torch.arange(k.shape[-2], dtype=torch.int32)[None]
        return layers[i].unrotate(k, 0)

    return unrotate
