"""Protocol 2, the seed repo's: quantize a prefix's K/V post hoc, score the continuation.

For each window of L tokens: the first L - c - 1 tokens (the prefix) run once with an exact
``DynamicCache``; each pipeline then quantizes and dequantizes that whole cache at once
(statistics over the prefix), and the last c + 1 tokens run on top of it with exact K/V for
themselves, scoring the last c tokens. The seed used 150-token prefixes and c = 30
(REFERENCE.md §1). The prefix forward is shared by all pipelines.
"""

from __future__ import annotations

import time

import torch

from kvq.eval.caches import fp16_bytes
from kvq.eval.errors import EvalError
from kvq.eval.protocols.base import Protocol, Score, nll_sum
from kvq.hf.compat import cache_kwargs


class Seed(Protocol):
    name = "seed"
    description = "prefix K/V quantized post hoc, continuation scored"

    def __init__(self, continuation: int = 32):
        self.continuation = continuation

    def check(self, context: int) -> None:
        if context < self.continuation + 3:
            raise EvalError(
                f"the seed protocol scores {self.continuation} continuation tokens, so "
                f"--context must be at least {self.continuation + 3} (got {context})"
            )

    def run(self, model, windows, configs, tick=lambda: None):
        from transformers import DynamicCache

        out = {label: Score() for label in configs}
        split = windows.shape[1] - self.continuation - 1
        for w in windows:
            with torch.no_grad():
                exact = DynamicCache(config=model.config)
                model(w[None, :split], **cache_kwargs(model, exact), use_cache=True)
            for label, cfg in configs.items():
                start = time.perf_counter()
                cache, nbytes = _quantized_copy(exact, cfg, model.config)
                with torch.no_grad():
                    kw = cache_kwargs(model, cache)
                    logits = model(w[None, split:], use_cache=True, **kw).logits[0]
                out[label].add(
                    Score(
                        nll=nll_sum(logits[:-1], w[split + 1 :]),
                        tokens=self.continuation,
                        cache_bytes=nbytes,
                        fp16_bytes=fp16_bytes(model.config, split),
                        seconds=time.perf_counter() - start,
                        windows=1,
                    )
                )
                tick()
        return out


def _quantized_copy(exact, cfg, model_config):
    """A new DynamicCache holding ``exact``'s K/V after a quantize/dequantize round trip."""
    from transformers import DynamicCache

    cache, nbytes = DynamicCache(config=model_config), 0
    for i, layer in enumerate(exact.layers):
        kp, vp = cfg.for_layer(i)
        kq, vq = kp.quantize(layer.keys), vp.quantize(layer.values)
        nbytes += _held(kq, kp) + _held(vq, vp)
        cache.update(kp.dequantize(kq), vp.dequantize(vq), i)
    return cache, nbytes


def _held(q, pipeline) -> int:
    """Bytes at rest; an identity pipeline is counted at fp16 (what an fp16 cache would hold)."""
    if pipeline.is_identity:
        return q.codes.numel() * 2
    return q.nbytes
