"""The ``ruler`` task of ``kvq compare``: RULER-style retrieval through a fresh KVQCache per prompt.

Documents come from :mod:`kvq.eval.tasks.ruler` with the comparison's corpus as the haystack,
at ``--needle-lengths`` tokens, ``--needle-per-length`` documents per length and subtask. Each
prompt is prefilled with ``prefill="quantized"`` (the needles are read back from quantized K/V
only) and continued greedily; the score is the share of expected strings in the generated text.
One row per (subtask, length, pipeline): mean score, its difference from the fp16 cache, stored
bits/element.
"""

from __future__ import annotations

from kvq.eval import corpus as corpora
from kvq.eval.needle_runner import generate_answer, size_columns
from kvq.eval.pipelines import BASELINE
from kvq.eval.tasks.ruler import TASKS, make_documents, score


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
            text, stats = generate_answer(model, tokenizer, settings, cfg, doc["prompt"],
                                          doc["max_new_tokens"])
            a = acc.setdefault((doc["task"], doc["length"], label), [0.0, 0, 0.0, 0, 0])
            a[0] += score(text, doc["answers"])
            for i, v in enumerate(stats, 1):
                a[i] += v
            bar.tick()
    rows = []
    for task in TASKS:
        for length in settings.needle_lengths:
            total, n = acc[(task, length, BASELINE)][:2]
            for label, cfg in configs.items():
                got, n, secs, nbytes, f16 = acc[(task, length, label)]
                rows.append({
                    "task": "ruler", "protocol": task, "context": length, "pipeline": label,
                    "metric": "string_match_all", "value": got / n,
                    "delta": got / n - total / acc[(task, length, BASELINE)][1],
                    **size_columns(cfg, n, secs, nbytes, f16),
                })
    return rows
