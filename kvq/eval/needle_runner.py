"""The ``needle`` task of ``kvq compare``: greedy generation through a fresh KVQCache per document.

The prompt (haystack + question, see :mod:`kvq.eval.tasks.needle`) is prefilled with
``prefill="quantized"``, so the needle is read back from quantized K/V only; up to 8 tokens are
generated greedily and the first number in them must equal the needle. One row per
(length, pipeline): exact-match rate, its difference from the fp16 cache, stored bits/element.
"""

from __future__ import annotations

import time

import torch

from kvq.eval.caches import fp16_bytes, is_identity, make_cache
from kvq.eval.pipelines import BASELINE
from kvq.eval.tasks.needle import first_number, make_documents
from kvq.hf.compat import cache_kwargs


def needle_rows(model, tokenizer, settings, configs, bar) -> list[dict]:
    docs = make_documents(
        settings.needle_lengths,
        settings.needle_per_length,
        count_tokens=lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"]),
    )
    bar.total(len(docs) * len(configs))
    bar.describe("needle")
    hits: dict = {}
    for label, cfg in configs.items():
        for doc in docs:
            text, stats = generate_answer(model, tokenizer, settings, cfg, doc["prompt"], 8)
            h = hits.setdefault((doc["length"], label), [0, 0, 0.0, 0, 0])
            h[0] += first_number(text) == doc["answer"]
            for i, v in enumerate(stats, 1):
                h[i] += v
            bar.tick()
    rows = []
    for length in settings.needle_lengths:
        base = hits[(length, BASELINE)][0] / hits[(length, BASELINE)][1]
        for label, cfg in configs.items():
            n_hit, n, secs, nbytes, f16 = hits[(length, label)]
            rows.append(
                {
                    "task": "needle",
                    "protocol": "generate",
                    "context": length,
                    "pipeline": label,
                    "metric": "exact_match",
                    "value": n_hit / n,
                    "delta": n_hit / n - base,
                    **size_columns(cfg, n, secs, nbytes, f16),
                }
            )
    return rows


def generate_answer(model, tokenizer, settings, cfg, prompt: str, max_new_tokens: int
                    ) -> tuple[str, tuple[int, float, int, int]]:
    """Greedy continuation of ``prompt`` through a fresh cache of ``cfg`` prefilled with
    ``prefill="quantized"``: ``(text, (1, seconds, cache bytes, fp16 bytes))``."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    cache = make_cache(cfg, model, prefill="quantized", block=settings.block,
                       residual=settings.residual)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             **cache_kwargs(model, cache), max_new_tokens=max_new_tokens,
                             do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text, (1, time.perf_counter() - start, cache.nbytes,
                  fp16_bytes(model.config, cache.get_seq_length()))


def size_columns(cfg, n: int, secs: float, nbytes: int, f16: int) -> dict:
    """The bits/element, bytes, time and count columns of a generation row over ``n`` prompts."""
    identity = is_identity(cfg)
    return {"bits_per_element": 16.0 if identity else 16 * nbytes / max(f16, 1),
            "cache_bytes": (f16 if identity else nbytes) // n, "fp16_bytes": f16 // n,
            "seconds": round(secs, 3), "tokens": n, "windows": n}
