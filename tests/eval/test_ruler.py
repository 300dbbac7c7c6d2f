"""RULER-style retrieval: deterministic generators, needles planted in real text, scoring."""

import pytest

from kvq.eval.tasks import ruler

TEXT = " ".join(
    f"Sentence {i} of the test haystack says that the {w} river runs past the old mill."
    for i, w in enumerate(["brown", "cold", "wide", "slow", "quiet", "long"] * 12))


def _docs(**kw):
    return ruler.make_documents(TEXT, lengths=(128, 256), per_length=2, **kw)


def test_generators_are_deterministic_and_seeded():
    assert _docs() == _docs()
    assert [d["prompt"] for d in _docs(seed=1)] != [d["prompt"] for d in _docs()]
    assert [(d["task"], d["length"]) for d in _docs()][:4] == [
        ("niah_single", 128), ("niah_single", 128), ("niah_single", 256), ("niah_single", 256)]


@pytest.mark.parametrize("task", ruler.TASKS)
def test_needles_and_answers_are_in_the_prompt_at_the_asked_length(task):
    count = lambda s: len(s.split())  # noqa: E731  (a whitespace "tokenizer")
    for doc in ruler.make_documents(TEXT, [task], (200, 400), 3, count_tokens=count):
        body, question = doc["prompt"].split("\n\nQuestion: ")
        assert doc["length"] - 40 <= count(doc["prompt"]) <= doc["length"]
        assert all(a in body for a in doc["answers"]) and "\nAnswer: " in question
        assert not any(a in question for a in doc["answers"])
        if task == "niah_multikey":
            assert body.count("special magic numbers for") == 4 and len(doc["answers"]) == 1
        if task == "niah_multivalue":
            assert len(set(doc["answers"])) == 4
        if task == "variable_tracking":
            first = doc["answers"][0]
            assert f"VAR {first} = " in body and len(doc["answers"]) == 5
            for a, b in zip(doc["answers"], doc["answers"][1:]):  # the chain is in text order
                assert body.index(f"VAR {a} =") < body.index(f"VAR {b} = VAR {a}.")


def test_haystack_is_the_given_text():
    doc = ruler.make_documents(TEXT, ["niah_single"], (200,), 1)[0]
    needle = next(s for s in doc["prompt"].split(". ") if "magic" in s)
    body = doc["prompt"].split("\n\nQuestion")[0].replace(needle + ". ", "")
    assert body in TEXT + " " + TEXT  # consecutive sentences of the text (wrapping at the end)


def test_score_is_the_share_of_answers_found_as_whole_words():
    assert ruler.score("1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert ruler.score("12345678", ["1234567"]) == 0.0  # not a whole number
    assert ruler.score("KALOMI, TUVAS", ["KALOMI", "TUVAS", "RENPO", "ZELDOR"]) == 0.5
    assert ruler.process_results({"answers": ["42"]}, ["It is 42."]) == {"score": 1.0}


def test_bad_task_and_short_haystack_are_errors():
    with pytest.raises(ValueError, match="unknown retrieval task 'niah'"):
        ruler.make_documents(TEXT, ["niah"])
    with pytest.raises(ValueError, match="fewer than 8 sentences"):
        ruler.make_documents("One two three. Four five six.")


@pytest.mark.slow
def test_unquantized_smollm2_solves_single_needles():
    """Solvable where meaningful: the real SmolLM2-135M with an fp16 cache finds single needles
    in 512 tokens of held-out Shakespeare (tiny random test models cannot)."""
    import torch

    from kvq.eval import corpus, models

    try:
        model, tok = models.load("smollm2")
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"SmolLM2-135M is not available: {err}")
    docs = ruler.make_documents("\n\n".join(corpus.load_documents("shakespeare")),
                                ["niah_single"], (512,), 4,
                                count_tokens=lambda s: len(tok(s)["input_ids"]))
    hits = 0
    for d in docs:
        ids = tok(d["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=d["max_new_tokens"], do_sample=False)
        hits += ruler.score(tok.decode(out[0, ids.shape[1]:]), d["answers"])
    assert hits >= 3


def test_compare_runs_the_ruler_task(tiny_dir, text_file, tmp_path, capsys):
    import json

    from kvq.cli.main import main

    out = tmp_path / "out"
    assert main(["compare", "--quiet", "--model", str(tiny_dir), "--corpus", str(text_file),
                 "--pipelines", "naive4", "--bits", "4", "--tasks", "ruler",
                 "--needle-lengths", "96", "--needle-per-length", "1", "--block", "8",
                 "--residual", "8", "--out", str(out)]) == 0
    assert "**ruler / variable_tracking**" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted((r["protocol"], r["pipeline"]) for r in rows) == sorted(
        (t, p) for t in ruler.TASKS for p in ("fp16", "naive4"))
    assert all(0 <= r["value"] <= 1 for r in rows)
    assert all(r["delta"] == 0 for r in rows if r["pipeline"] == "fp16")
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
