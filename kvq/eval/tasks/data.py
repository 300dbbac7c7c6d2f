"""``custom_dataset`` functions of the shipped lm-eval tasks.

lm-eval calls them with the task's ``metadata`` merged with the ``--model_args`` and
``--metadata`` of the run, so ``pretrained=`` (and ``gguf_file=``/``tokenizer=``) are available
to count tokens with the model's own tokenizer.
"""

from __future__ import annotations


def ppl_dataset(corpus: str = "shakespeare", max_chars: int = 20000, **_):
    """Test split of ``{"title", "text"}`` documents of ``corpus`` (see
    :func:`kvq.eval.corpus.load_documents`), each cut to its first ``max_chars`` characters
    (0 = whole documents; the full eval split is ~250k tokens)."""
    import datasets

    from kvq.eval.corpus import load_documents

    docs = load_documents(corpus)
    if max_chars:
        docs = [d[: int(max_chars)] for d in docs]
    rows = [{"title": f"{corpus}#{i}", "text": d} for i, d in enumerate(docs)]
    return {"test": datasets.Dataset.from_list(rows)}


def needle_dataset(
    lengths=(256, 512, 1024),
    per_length: int = 4,
    seed: int = 0,
    pretrained=None,
    tokenizer=None,
    gguf_file=None,
    **_,
):
    """Test split of needle documents (see :mod:`kvq.eval.tasks.needle`); lengths are counted
    with the model's tokenizer when ``pretrained``/``tokenizer`` name one, else estimated."""
    import datasets

    from kvq.eval.tasks.needle import make_documents

    count = _token_counter(tokenizer or pretrained, gguf_file)
    docs = make_documents([int(n) for n in lengths], int(per_length), int(seed), count_tokens=count)
    return {"test": datasets.Dataset.from_list(docs)}


def _token_counter(name, gguf_file):
    if not isinstance(name, str):
        return None
    from transformers import AutoTokenizer

    from kvq.eval.models import resolve

    path, extra = resolve(name)
    if gguf_file:
        extra = {"gguf_file": gguf_file}
    tok = AutoTokenizer.from_pretrained(path, **extra)
    return lambda s: len(tok(s, add_special_tokens=False)["input_ids"])


def ruler_dataset(
    subtask: str = "niah_single",
    lengths=(512, 1024),
    per_length: int = 4,
    seed: int = 0,
    corpus: str = "shakespeare",
    pretrained=None,
    tokenizer=None,
    gguf_file=None,
    **_,
):
    """Test split of RULER-style documents of one ``subtask`` (see :mod:`kvq.eval.tasks.ruler`)
    with the eval split of ``corpus`` as the haystack; lengths counted with the model's tokenizer
    when ``pretrained``/``tokenizer`` name one, else estimated."""
    import datasets

    from kvq.eval.corpus import load_documents
    from kvq.eval.tasks.ruler import make_documents

    count = _token_counter(tokenizer or pretrained, gguf_file)
    docs = make_documents("\n\n".join(load_documents(corpus)), [subtask],
                          [int(n) for n in lengths], int(per_length), int(seed),
                          count_tokens=count)
    return {"test": datasets.Dataset.from_list(docs)}
