"""Protocol 2, the seed repo's: quantize a prefix's K/V post hoc, score the continuation.

For each window of L tokens: the first L - c - 1 tokens (the prefix) run once with an exact
``DynamicCache``; each pipeline then quantizes and dequantizes that whole cache at once
(statistics over the prefix), and the last c + 1 tokens run on top of it with exact K/V for
themselves, scoring the last c tokens. The seed used 150-token prefixes and c = 30
(REFERENCE.md §1). The prefix forward is shared by all pipelines. Configs with pre-RoPE keys
have them un-rotated before and re-rotated after the round trip (:mod:`kvq.hf.rope`); with
``sinks: n`` the first n tokens stay exact and out of token statistics, as in the cache.
"""

from __future__ import annotations

import time

import torch

from kvq.eval.caches import fp16_bytes
from kvq.eval.errors import EvalError
from kvq.eval.metrics import Head
from kvq.eval.protocols.base import Protocol, Score, reference_first, window_stats


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
        head, split = Head(model), windows.shape[1] - self.continuation - 1
        for i, w in enumerate(windows):
            with torch.no_grad():
                exact = DynamicCache(config=model.config)
                head.forward(w[:split], exact)
            references: dict = {}
            for label in reference_first(configs):
                start = time.perf_counter()
                cache, nbytes = _quantized_copy(exact, configs[label], model)
                hidden = head.forward(w[split:], cache)[:-1]
                seconds = time.perf_counter() - start
                stats = window_stats(head, hidden, w[split + 1:], label, references, i)
                out[label].add(Score.of(stats, cache_bytes=nbytes,
                                        fp16_bytes=fp16_bytes(model.config, split),
                                        seconds=seconds, windows=1))
                tick()
        return out


def _quantized_copy(exact, cfg, model):
    """A new DynamicCache holding ``exact``'s K/V after a quantize/dequantize round trip."""
    from transformers import DynamicCache

    total = exact.get_seq_length()
    rope = _rope(cfg, model, total)
    cache, nbytes = DynamicCache(config=model.config), rope.nbytes if rope else 0
    # per layer: its rotation (Gemma 3: by layer type), None where the model does not rotate
    turns = rope.for_layers(model.config) if rope is not None else [None] * len(exact.layers)
    for i, layer in enumerate(exact.layers):
        kp, vp = cfg.for_layer(i)
        k, v = layer.keys, layer.values
        start = total - k.shape[-2]  # sliding-window layers hold only the newest tokens
        sinks = max(0, cfg.sinks - start)
        turn = turns[i]
        pre = turn is not None and cfg.key_rope_for(i) == "pre"
        kq, vq = kp.quantize(_no_sinks(turn.unrotate(k, start) if pre else k, kp, sinks)), \
            vp.quantize(_no_sinks(v, vp, sinks))
        kd, vd = kp.dequantize(kq), vp.dequantize(vq)
        if pre:
            kd = turn.rotate(kd, start)
        if sinks:
            kd[:, :, :sinks], vd[:, :, :sinks] = k[:, :, :sinks], v[:, :, :sinks]
            nbytes += sum(t[:, :, :sinks].numel() * t.element_size() for t in (k, v))
        nbytes += _held(kq, kp) + _held(vq, vp)
        cache.update(kd, vd, i)
    return cache, nbytes


def _rope(cfg, model, total: int):
    """A rotary tracker for positions 0..total-1 of ``model``, or None without pre-RoPE keys."""
    if not cfg.uses_pre_rope:
        return None
    from kvq.hf.rope import RopeTracker, rope_adapter

    rope = RopeTracker(rope_adapter(model.config))
    rope.bind(model)  # no hook: the positions are known here
    rope.positions = torch.arange(total, dtype=torch.int32, device=model.device)[None]
    return rope


def _no_sinks(x, pipeline, sinks: int):
    """x (B, H, T, D) with its first ``sinks`` rows kept out of token-axis statistics."""
    if not sinks or not pipeline.token_axis_stats:
        return x
    from kvq.hf.padding import fill_pads

    b, _, t, _ = x.shape
    valid = torch.ones(b, 1, t, dtype=torch.bool, device=x.device)
    valid[..., :sinks] = False
    unit = pipeline.token_block if pipeline.token_block and t % pipeline.token_block == 0 else t
    return fill_pads(x[:, :, None], valid, unit)[:, :, 0]


def _held(q, pipeline) -> int:
    """Bytes at rest; an identity pipeline is counted at fp16 (what an fp16 cache would hold)."""
    if pipeline.is_identity:
        return q.codes.numel() * 2
    return q.nbytes
