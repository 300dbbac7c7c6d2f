"""Protocol 3, streaming decode: prefill a prompt, then feed the rest one token at a time.

For each window of L tokens: the first L - s tokens are a prompt prefilled through a fresh
:class:`kvq.hf.KVQCache` (``prefill="exact"`` by default, as in serving: the prompt's own
attention sees exact K/V, the cache stores them quantized); the last s tokens are then fed one
per forward (teacher-forced decode), so every prediction reads the cache as a server would:
quantized blocks plus the full-precision residual window, with blocks flushed as decode goes on.
The s decoded tokens are scored. Costs s forwards per window and pipeline.
"""

from __future__ import annotations

import time

import torch

from kvq.eval.caches import fp16_bytes, make_cache
from kvq.eval.errors import EvalError
from kvq.eval.metrics import Head
from kvq.eval.protocols.base import Protocol, Score, reference_first, window_stats


class Streaming(Protocol):
    name = "streaming"
    description = "prompt prefilled, last tokens decoded one at a time through the cache"

    def __init__(
        self, steps: int = 32, prefill: str = "exact", block: int = 32, residual: int = 128
    ):
        self.steps, self.prefill = steps, prefill
        # the working copy only saves re-dequantizing every step; it is not counted as cache bytes
        self.cache_options = dict(block=block, residual=residual, keep_dequantized=True)

    def check(self, context: int) -> None:
        if context < self.steps + 2:
            raise EvalError(
                f"the streaming protocol decodes {self.steps} tokens, so --context must "
                f"be at least {self.steps + 2} (got {context})"
            )

    def run(self, model, windows, configs, tick=lambda: None):
        out, head, references = {}, Head(model), {}
        split = windows.shape[1] - self.steps
        for label in reference_first(configs):
            score = Score()
            for i, w in enumerate(windows):
                cache = make_cache(configs[label], model, prefill=self.prefill,
                                   **self.cache_options)
                start = time.perf_counter()
                rows = [head.forward(w[:split], cache)[-1]]
                for t in range(split, w.numel() - 1):
                    rows.append(head.forward(w[t : t + 1], cache)[-1])
                seconds = time.perf_counter() - start
                stats = window_stats(head, torch.stack(rows), w[split:], label, references, i)
                score.add(Score.of(stats, cache_bytes=_held(cache),
                                   fp16_bytes=fp16_bytes(model.config, w.numel() - 1),
                                   seconds=seconds, windows=1))
                tick()
            out[label] = score
        return {label: out[label] for label in configs}


def _held(cache) -> int:
    """Bytes at rest: packed blocks with metadata, the exact residual window, sinks and rotary
    positions (not the working copy)."""
    total = cache.memory_report().total
    return total.total_bytes - total.working_bytes
