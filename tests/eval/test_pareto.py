import json

import pytest

from kvq.eval.pareto import best_under, front, main, merge, points

SETTINGS = {"model": None, "corpus": "shakespeare", "contexts": [2048], "tokens": 4096}


def report():
    rows = [("fp16", 16, 0.0), ("a4", 4.5, 2.0), ("b4", 4.25, 3.0), ("c3", 3.5, 8.0),
            ("d3", 3.25, 9.5), ("e5", 5.0, 0.8), ("f4", 4.5, 2.5), ("g2", 2.5, 40.0),
            ("h3", 3.5, 10.0)]
    made = [dict(task="ppl", protocol="teacher-forced", context=2048, pipeline=p,
                 bits_per_element=b, delta=d) for p, b, d in rows]
    made.append(dict(made[1], context=512, delta=-5.0))  # another context: ignored
    for r in made:
        r["value"] = 30.0 + r["delta"]
    return {"model": {"name": "tiny"}, "settings": SETTINGS, "rows": made}


def test_front_and_budgets():
    rows = points(report())
    assert "fp16" not in {r["pipeline"] for r in rows} and len(rows) == 8
    assert [r["pipeline"] for r in front(rows)] == ["g2", "d3", "c3", "b4", "a4", "e5"]
    assert best_under(rows, 3.5)["pipeline"] == "c3"
    assert best_under(rows, 4.5)["pipeline"] == "a4"
    assert best_under(rows, 2.0) is None


def test_merge_checks_settings_and_baseline():
    a, b = report(), report()
    b["rows"] = [r for r in b["rows"] if r["pipeline"] in ("fp16", "a4")]
    b["rows"].append(dict(b["rows"][0], pipeline="z8", bits_per_element=8.5, delta=0.1))
    merged = merge([a, b])
    assert [r["pipeline"] for r in merged["rows"]].count("a4") == 2  # two contexts, once each
    assert "z8" in {r["pipeline"] for r in points(merged)}
    with pytest.raises(ValueError, match="tokens"):
        merge([a, {**b, "settings": {**SETTINGS, "tokens": 8192}}])
    b["rows"][0] = dict(b["rows"][0], value=31.0)
    with pytest.raises(ValueError, match="fp16 baselines differ"):
        merge([a, b])


def test_cli_writes_png_and_table(tmp_path, capsys):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(report()))
    merged = tmp_path / "merged.json"
    assert main([str(src), str(src), "--out", str(tmp_path / "p.png"), "--markdown",
                 "--merged", str(merged)]) == 0
    assert json.loads(merged.read_text())["rows"] == report()["rows"]
    out = capsys.readouterr().out
    assert "best at <= 3.5 bits/element: c3" in out and (tmp_path / "p.png").stat().st_size > 0
    assert "| **c3** | 3.500 | 38.00 | +8.00 | ● |" in out
    assert main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "q.png")]) == 2


def test_fp16_model_bits_counts_skipped_layers_at_16():
    from kvq.eval.pareto import fp16_model_bits

    rep = {"model": {"head_dim": 64, "layers": 4}, "settings": {"block": 32},
           "pipelines": {"n4": {"keys": "ptok>int4", "values": "ptok>int4"},
                         "s4": {"keys": "ptok>int4", "values": "ptok>int4", "skip": [0]}}}
    rows = [dict(pipeline="n4", bits_per_element=4.25), dict(pipeline="s4", bits_per_element=11.2)]
    got = fp16_model_bits(rep, rows)
    assert [r["bits_per_element"] for r in got] == [4.25, (3 * 4.25 + 16) / 4]
    assert got[1]["measured_bits"] == 11.2
    with pytest.raises(ValueError, match="measured 5.0"):
        fp16_model_bits(rep, [dict(pipeline="n4", bits_per_element=5.0)])
