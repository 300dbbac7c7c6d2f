"""Protocol 1, teacher-forced windows: one forward per window, every token's K/V quantized.

Each window of L tokens runs in a single prefill through a fresh :class:`kvq.hf.KVQCache` with
``prefill="quantized"``, so attention at every position reads quantized-then-dequantized K/V
(statistics over tokens, such as per-channel scales, are taken per cache block of ``block``
tokens, default 32, as the cache does in serving). Tokens 2..L are scored.
This is the strictest single-pass measure; an exact-prefill cache would measure nothing here.
"""

from __future__ import annotations

import time

import torch

from kvq.eval.caches import fp16_bytes, make_cache
from kvq.eval.protocols.base import Protocol, Score, nll_sum


class TeacherForced(Protocol):
    name = "teacher-forced"
    description = "one pass per window, all K/V quantized in prefill"

    def __init__(self, block: int = 32, residual: int = 128):
        self.cache_options = dict(block=block, residual=residual)

    def run(self, model, windows, configs, tick=lambda: None):
        out = {}
        for label, cfg in configs.items():
            score = Score()
            for w in windows:
                cache = make_cache(cfg, model, prefill="quantized", **self.cache_options)
                start = time.perf_counter()
                with torch.no_grad():
                    logits = model(w[None], past_key_values=cache, use_cache=True).logits[0]
                score.add(
                    Score(
                        nll=nll_sum(logits[:-1], w[1:]),
                        tokens=w.numel() - 1,
                        cache_bytes=cache.nbytes,
                        fp16_bytes=fp16_bytes(model.config, w.numel()),
                        seconds=time.perf_counter() - start,
                        windows=1,
                    )
                )
                tick()
            out[label] = score
        return out
