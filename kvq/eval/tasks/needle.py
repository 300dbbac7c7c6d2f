"""Needle-in-a-haystack documents: a five-digit number hidden in filler text, asked for at the end.

Each document has ``prompt`` (the haystack with the needle sentence at a given depth, then the
question and the start of the answer), ``answer`` (the number), ``length`` (target prompt tokens)
and ``depth`` (0..1, where the needle sits). Generation is deterministic for a given ``seed``.
Lengths are counted with ``count_tokens`` when given, else estimated as 4 tokens per 3 words.
Scored by exact match of the first number the model generates.
"""

from __future__ import annotations

import random
from collections.abc import Callable

FILLER = (
    "The river ran slowly past the old mill, and the water was brown with the autumn rain.",
    "In the market square the traders set out their baskets of apples, pears and late plums.",
    "A long road climbed the hill behind the village, lined on both sides with chestnut trees.",
    "The library kept its oldest maps in a cool room at the back, away from the windows.",
    "Every morning the baker lit the ovens before dawn and swept the flour from the step.",
    "The committee met on Tuesdays to discuss the repair of the bridge and the cost of stone.",
    "Sheep grazed on the far meadow, and a dog lay in the shade of the wall watching them.",
    "The train to the coast left at noon and stopped at every small station along the valley.",
    "Letters arrived twice a week, carried up the lane by a boy on a bicycle with a bell.",
    "The garden was divided into neat beds of onions, cabbages, beans and tall sunflowers.",
    "On winter evenings the family sat by the stove and mended nets for the coming season.",
    "The museum displayed a collection of clocks, some of which still struck the hours.",
    "A storm in the night brought down two branches of the elm beside the church.",
    "The school taught arithmetic, geography and music, and the children sang each morning.",
    "Fishermen returned in the late afternoon and sold their catch on the harbour wall.",
    "The inn by the crossroads served soup and bread to travellers and kept a fire burning.",
    "Workers painted the lighthouse white again in spring, as they did every few years.",
    "The orchard produced more cider apples than anyone could remember from earlier harvests.",
    "A narrow canal connected the town to the river, and barges carried coal along it.",
    "In summer the hills turned golden, and the farmers cut the hay and stacked it in barns.",
)
NEEDLE = "The special magic number is {number}."
QUESTION = "What is the special magic number mentioned in the text above?"
ANSWER_PREFIX = "The special magic number is"


def make_documents(
    lengths=(256, 512, 1024),
    per_length: int = 4,
    seed: int = 0,
    count_tokens: Callable[[str], int] | None = None,
) -> list[dict]:
    """``per_length`` documents per target length, needles at evenly spread depths."""
    count = count_tokens or (lambda s: max(1, round(len(s.split()) * 4 / 3)))
    rng = random.Random(seed)
    sizes = {s: count(" " + s) for s in FILLER}
    tail = f"\n\nQuestion: {QUESTION}\nAnswer: {ANSWER_PREFIX}"
    docs = []
    for length in lengths:
        for i in range(per_length):
            number = str(rng.randint(10000, 99999))
            needle = NEEDLE.format(number=number)
            budget = length - count(tail) - count(" " + needle)
            sentences, used = [], 0
            while True:
                s = rng.choice(FILLER)
                if sentences and used + sizes[s] > budget:
                    break
                sentences.append(s)
                used += sizes[s]
            depth = (i + 0.5) / per_length
            sentences.insert(round(depth * len(sentences)), needle)
            docs.append(
                {
                    "prompt": " ".join(sentences) + tail,
                    "answer": number,
                    "length": int(length),
                    "depth": round(depth, 3),
                }
            )
    return docs


def first_number(text: str) -> str:
    """The first run of digits in ``text`` (what the needle task compares), or ``""``."""
    import re

    m = re.search(r"\d+", text)
    return m.group(0) if m else ""
