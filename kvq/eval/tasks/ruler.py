"""RULER-style long-context retrieval tasks, generated deterministically from real text.

After RULER (Hsieh et al., 2024): key-value "needles" are planted at spread depths in a
haystack of real text (a slice of a shipped corpus, cut at sentence ends), then asked for.

* ``niah_single``: one needle "One of the special magic numbers for KEY is: NNNNNNN."; asked
  for KEY's number.
* ``niah_multikey``: the needle plus three distractor needles with other keys; asked for one.
* ``niah_multivalue``: four needles with the same key and different numbers; asked for all four.
* ``variable_tracking``: a chain ``VAR A = 12345.``, ``VAR B = VAR A.``, ... (four hops) and a
  distractor chain from another value; asked which variables hold the first value.

Each document: ``prompt`` (haystack with needles, question, and RULER's answer prefix, e.g.
"Answer: The special magic number for KEY mentioned in the provided text is"), ``answers`` (the
strings that must appear in the generated text), ``task``, ``length`` (target prompt tokens),
``max_new_tokens``. Score (RULER's ``string_match_all``): the share of ``answers`` found in the
generated text. Everything depends only on ``seed``, the haystack text and the tokenizer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
_SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "vas", "po", "zel", "dor", "fi", "gan", "shu")
_NEW_TOKENS = {"niah_single": 16, "niah_multikey": 16, "niah_multivalue": 56,
               "variable_tracking": 32}


def make_documents(haystack: str, tasks=TASKS, lengths=(512, 1024), per_length: int = 2,
                   seed: int = 0, count_tokens: Callable[[str], int] | None = None) -> list[dict]:
    """``per_length`` documents per task and target length from ``haystack`` (real text)."""
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown retrieval task {bad[0]!r}; known: {', '.join(TASKS)}")
    count = count_tokens or (lambda s: max(1, round(len(s.split()) * 4 / 3)))
    sentences = _sentences(haystack)
    if len(sentences) < 8:
        raise ValueError("the haystack text has fewer than 8 sentences; use a longer corpus")
    docs = []
    for task in tasks:
        for length in lengths:
            for i in range(per_length):
                rng = random.Random(f"{seed}/{task}/{length}/{i}")
                needles, question, prefix, answers = _BUILD[task](rng)
                tail = f"\n\nQuestion: {question}\nAnswer: {prefix}"
                budget = length - count(tail) - sum(count(" " + n) for n in needles)
                filler = _filler(sentences, rng, budget, count)
                text = _plant(filler, needles, rng)
                docs.append({"task": task, "length": length, "prompt": text + tail,
                             "answers": answers, "max_new_tokens": _NEW_TOKENS[task]})
    return docs


def score(generated: str, answers: list[str]) -> float:
    """Share of ``answers`` that occur in ``generated`` (whole words/numbers)."""
    found = sum(bool(re.search(rf"(?<![\w]){re.escape(a)}(?![\w])", generated)) for a in answers)
    return found / len(answers)


def _key(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(3))


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _niah(rng: random.Random, keys: int, values: int):
    names = list(dict.fromkeys(_key(rng) for _ in range(4 * keys)))[:keys]
    target = names[0]
    nums = list(dict.fromkeys(_number(rng) for _ in range(4 * values)))[:values]
    needles = [NEEDLE.format(key=target, value=v) for v in nums]
    needles += [NEEDLE.format(key=k, value=_number(rng)) for k in names[1:]]
    if values > 1:
        question = (f"What are all the special magic numbers for {target} mentioned in the "
                    "provided text?")
        prefix = f"The special magic numbers for {target} mentioned in the provided text are"
    else:
        question = f"What is the special magic number for {target} mentioned in the provided text?"
        prefix = f"The special magic number for {target} mentioned in the provided text is"
    return needles, question, prefix, nums


def _variables(rng: random.Random):
    names = list(dict.fromkeys(_key(rng).upper() for _ in range(40)))[:10]
    value, other = _number(rng, 5), _number(rng, 5)
    chain, decoy = names[:5], names[5:10]
    needles = [f"VAR {chain[0]} = {value}."]
    needles += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:], strict=False)]
    needles += [f"VAR {decoy[0]} = {other}."]
    needles += [f"VAR {b} = VAR {a}." for a, b in zip(decoy, decoy[1:], strict=False)]
    # plant each chain in order, the two interleaved
    needles = [n for pair in zip(needles[:5], needles[5:], strict=True) for n in pair]
    question = (f"Which variables are assigned the value {value}, directly or through other "
                "variables?")
    prefix = (f"According to the chains of variable assignments in the text above, "
              f"{len(chain)} variables are assigned the value {value}, they are:")
    return needles, question, prefix, chain


_BUILD = {
    "niah_single": lambda rng: _niah(rng, keys=1, values=1),
    "niah_multikey": lambda rng: _niah(rng, keys=4, values=1),
    "niah_multivalue": lambda rng: _niah(rng, keys=1, values=4),
    "variable_tracking": _variables,
}


def _sentences(text: str) -> list[str]:
    flat = " ".join(text.split())
    return [s for s in re.split(r"(?<=[.!?])\s+", flat) if 3 <= len(s.split()) <= 80]


def _filler(sentences: list[str], rng: random.Random, budget: int, count) -> list[str]:
    """Consecutive sentences from a seeded start (wrapping) whose token count fits ``budget``."""
    out, used, i = [], 0, rng.randrange(len(sentences))
    for _ in range(len(sentences)):
        n = count(" " + sentences[i])
        if used + n > budget:
            break
        out.append(sentences[i])
        used += n
        i = (i + 1) % len(sentences)
    return out


def _plant(filler: list[str], needles: list[str], rng: random.Random) -> str:
    """Needles at evenly spread depths (order kept), each shifted by a seeded jitter."""
    n, slots = len(needles), len(filler) + 1
    at = sorted(min(slots - 1, max(0, round((k + 0.5) * slots / n) + rng.randint(-1, 1)))
                for k in range(n))
    out, j = [], 0
    for pos in range(slots):
        while j < n and at[j] == pos:
            out.append(needles[j])
            j += 1
        if pos < len(filler):
            out.append(filler[pos])
    return " ".join(out)


def process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval hook: ``{"score": share of the document's answers in the generated text}``."""
    return {"score": score(results[0], doc["answers"])}
