"""The ``ruler`` task of ``kvq compare``: RULER-style retrieval through a fresh KVQCache per prompt.

Documents come from :mod:`kvq.eval.tasks.ruler` with the comparison's corpus as the haystack,
at ``--needle-lengths`` tokens, ``--needle-per-length`` documents per length and subtask. Each
prompt is prefilled with ``prefill="quantized"`` (the needles are read back from quantized K/V
only) and continued greedily; the score is the share of expected strings in the generated text.
One row per (subtask, length, pipeline): mean score, its difference from the fp16 cache, stored
bits/element.
"""

from __future__ import annotations

import time

import torch

from kvq.eval import corpus as corpora
from kvq.eval.caches import fp16_bytes, is_identity, make_cache
from kvq.eval.pipelines import BASELINE
from kvq.eval.tasks.ruler import TASKS, make_documents, score
from kvq.hf.compat import cache_kwargs


def ruler_rows(model, tokenizer, settings, configs, bar) -> list[dict]:
    docs = make_documents(
        "\n\n".join(corpora.load_documents(settings.corpus)), TASKS, settings.needle_lengths,
        settings.needle_per_length,
        count_tokens=lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"]),
    )
    bar.total(len(docs) * len(configs))
    bar.describe("ruler")
    acc: dict = {}
    for label, cfg in configs.items():
        for doc in docs:
            ids = tokenizer(doc["prompt"], return_tensors="pt")["input_ids"].to(model.device)
            cache = make_cache(cfg, model, prefill="quantized", block=settings.block,
                               residual=settings.residual)
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                     **cache_kwargs(model, cache),
                                     max_new_tokens=doc["max_new_tokens"], do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            a = acc.setdefault((doc["task"], doc["length"], label), [0.0, 0, 0.0, 0, 0])
            a[0] += score(text, doc["answers"])
            a[1] += 1
            a[2] += time.perf_counter() - start
            a[3] += cache.nbytes
            a[4] += fp16_bytes(model.config, cache.get_seq_length())
            bar.tick()
    rows = []
    for task in TASKS:
        for length in settings.needle_lengths:
            total, n = acc[(task, length, BASELINE)][:2]
            for label, cfg in configs.items():
                got, n, secs, nbytes, f16 = acc[(task, length, label)]
                identity = is_identity(cfg)
                rows.append({
                    "task": "ruler", "protocol": task, "context": length, "pipeline": label,
                    "metric": "string_match_all", "value": got / n,
                    "delta": got / n - total / acc[(task, length, BASELINE)][1],
                    "bits_per_element": 16.0 if identity else 16 * nbytes / max(f16, 1),
                    "cache_bytes": (f16 if identity else nbytes) // n, "fp16_bytes": f16 // n,
                    "seconds": round(secs, 3), "tokens": n, "windows": n,
                })
    return rows
