from kvq.eval.tasks.needle import ANSWER_PREFIX, first_number, make_documents


def words(s: str) -> int:
    return len(s.split())


def test_documents_are_deterministic_and_hit_their_length():
    docs = make_documents([100, 300], per_length=3, seed=1, count_tokens=words)
    assert docs == make_documents([100, 300], per_length=3, seed=1, count_tokens=words)
    assert docs != make_documents([100, 300], per_length=3, seed=2, count_tokens=words)
    for d in docs:
        assert d["length"] - 25 <= words(d["prompt"]) <= d["length"]
        assert d["prompt"].count(d["answer"]) == 1 and d["prompt"].endswith(ANSWER_PREFIX)
    depths = [d["depth"] for d in docs if d["length"] == 300]
    assert depths == sorted(depths) and 0 < depths[0] < depths[-1] < 1
    first = docs[3]["prompt"].index(docs[3]["answer"]) / len(docs[3]["prompt"])
    last = docs[5]["prompt"].index(docs[5]["answer"]) / len(docs[5]["prompt"])
    assert first < 0.4 < 0.6 < last  # the needle really moves with depth


def test_first_number():
    assert first_number(" 48213.\n") == "48213"
    assert first_number("is 12 or 34") == "12"
    assert first_number("none") == ""
