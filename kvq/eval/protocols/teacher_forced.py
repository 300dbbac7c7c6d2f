"""Protocol 1, teacher-forced windows: one forward per window, every token's K/V quantized.

Each window of L tokens runs in a single prefill through a fresh :class:`kvq.hf.KVQCache` with
``prefill="quantized"``, so attention at every position reads quantized-then-dequantized K/V
(statistics over tokens, such as per-channel scales, are taken per cache block of ``block``
tokens, default 32, as the cache does in serving). Tokens 2..L are scored.
This is the strictest single-pass measure; an exact-prefill cache would measure nothing here.
"""

from __future__ import annotations

import time

from kvq.eval.caches import fp16_bytes, make_cache
from kvq.eval.metrics import Head
from kvq.eval.protocols.base import Protocol, Score, reference_first, window_stats


class TeacherForced(Protocol):
    name = "teacher-forced"
    description = "one pass per window, all K/V quantized in prefill"

    def __init__(self, block: int = 32, residual: int = 128):
        self.cache_options = dict(block=block, residual=residual)

    def run(self, model, windows, configs, tick=lambda: None):
        out, head, references = {}, Head(model), {}
        for label in reference_first(configs):
            score = Score()
            for i, w in enumerate(windows):
                cache = make_cache(configs[label], model, prefill="quantized",
                                   **self.cache_options)
                start = time.perf_counter()
                hidden = head.forward(w, cache)[:-1]
                seconds = time.perf_counter() - start
                stats = window_stats(head, hidden, w[1:], label, references, i)
                score.add(Score.of(stats, cache_bytes=cache.nbytes,
                                   fp16_bytes=fp16_bytes(model.config, w.numel()),
                                   seconds=seconds, windows=1))
                tick()
            out[label] = score
        return {label: out[label] for label in configs}
