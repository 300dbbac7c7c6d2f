"""``kvq compare`` over several models x corpora: one report, a summary per budget, resume."""

import json

import pytest

from kvq.cli.main import main
from kvq.eval import matrix


def _args(tiny_dir, corpora, out, bits="4,2"):
    return ["compare", "--quiet", "--no-plot", "--model", str(tiny_dir), "--corpus", corpora,
            "--pipelines", "naive4,group(8,token)>int4(asym)", "--bits", bits, "--context", "32",
            "--tokens", "64", "--protocols", "teacher-forced", "--block", "8", "--residual",
            "8", "--out", str(out)]


def test_matrix_report_summary_and_resume(tiny_dir, text_file, tmp_path, capsys, monkeypatch):
    other = tmp_path / "other.txt"
    other.write_text("def f(x):\n    return x + 1\n" * 60)
    out = tmp_path / "m"
    assert main(_args(tiny_dir, f"{text_file},{other}", out)) == 0
    captured = capsys.readouterr()
    assert "cell 2/2" in captured.err and "Best pipeline within each budget" in captured.out
    report = json.loads((out / "results.json").read_text())
    assert report["kind"] == "matrix" and len(report["cells"]) == 2
    assert [s["budget"] for s in report["summary"]] == [2.5, 3.5, 4.5] * 2
    for s, cell in zip(report["summary"], [c for c in report["cells"] for _ in range(3)]):
        fits = [r for r in cell["rows"] if r["pipeline"] != "fp16"
                and r["bits_per_element"] <= s["budget"]]
        assert s["corpus"] == cell["settings"]["corpus"]
        assert s["best"] == (min(fits, key=lambda r: r["delta"]) if fits else None)
    assert len(list((out / "cells").glob("*.json"))) == 2
    from kvq.eval.plot import write_matrix_png

    assert write_matrix_png(report, tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"

    import kvq.eval.compare as compare

    monkeypatch.setattr(compare, "run", lambda *a, **k: pytest.fail("cells must be reused"))
    assert main(_args(tiny_dir, f"{text_file},{other}", out)) == 0
    assert "reused" in capsys.readouterr().err
    assert main(_args(tiny_dir, f"{text_file},{other}", out, bits="4")) == 2
    assert "made with other settings (bits, pipelines)" in capsys.readouterr().err


def test_summary_picks_the_lowest_delta_within_each_budget():
    rows = [dict(task="ppl", protocol="p", context=8, pipeline=n, bits_per_element=b, delta=d,
                 value=10 + d)
            for n, b, d in (("fp16", 16, 0.0), ("a", 2.3, 3.0), ("b", 2.4, 2.0),
                            ("c", 3.5, 0.5), ("d", 4.5, 0.1), ("e", 5.0, 0.0))]
    cell = {"rows": rows, "model": {"name": "m"}, "settings": {"corpus": "c"}}
    best = [s["best"]["pipeline"] for s in matrix.summary([cell])]
    assert best == ["b", "c", "d"]
    assert matrix.summary([dict(cell, rows=rows[:1] + rows[4:])])[0]["best"] is None
