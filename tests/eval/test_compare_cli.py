import json

import pytest

from kvq.cli.main import main


def compare(*args):
    return main(["compare", "--quiet", *args])


def test_compare_end_to_end_writes_table_json_markdown_png(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = compare(
        "--model",
        str(tiny_dir),
        "--corpus",
        str(text_file),
        "--pipelines",
        "naive4,group(8,token)>int4(asym)",
        "--bits",
        "4,2",
        "--context",
        "32,64",
        "--tokens",
        "64",
        "--protocols",
        "teacher-forced,seed,streaming",
        "--seed-continuation",
        "8",
        "--stream-steps",
        "4",
        "--block",
        "8",
        "--residual",
        "8",
        "--tasks",
        "ppl,needle",
        "--needle-lengths",
        "48",
        "--needle-per-length",
        "1",
        "--out",
        str(out),
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| context | pipeline | bits/elt | PPL | ΔPPL | ΔPPL 95% CI | KL |" in printed
    assert "naive2" in printed
    report = json.loads((out / "results.json").read_text())
    rows = report["rows"]
    labels = report["settings"]["pipelines"]
    assert labels[:3] == ["fp16", "naive4", "naive2"] and len(labels) == 5
    assert len([r for r in rows if r["task"] == "ppl"]) == 3 * 2 * 5
    assert len([r for r in rows if r["task"] == "needle"]) == 5
    for r in rows:
        if r["pipeline"] == "fp16" and r["task"] == "ppl":
            assert r["delta"] == 0 and r["bits_per_element"] == 16
            assert r["kl"] == 0 and r["top1"] == 1 and r["delta_ci"] == [0, 0]
        if r["task"] == "ppl":
            lo, hi = r["kl_ci"]
            assert 0 <= lo <= r["kl"] <= hi and r["kl"] <= r["kl_p99"] or r["kl"] == 0
            assert r["delta_ci"][0] <= r["delta"] <= r["delta_ci"][1] and 0 <= r["top1"] <= 1
        if r["pipeline"] == "naive2" and r["protocol"] in ("teacher-forced", "seed"):
            assert r["bits_per_element"] < 4 and r["cache_bytes"] < r["fp16_bytes"] / 4
    assert (out / "results.md").read_text().startswith("Model:")
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tasks", "mmlu"], "unknown task 'mmlu'"),
        (["--pipelines", "naieve4"], "pipeline 'naieve4'"),
        (["--protocols", "teacher_forced"], "did you mean 'teacher-forced'"),
        (["--context", "1024"], "longer than the model's maximum of 256"),
        (["--pipelines", "group(24)>int4", "--context", "48"], "cannot run on this model"),
        (["--context", "0"], "positive integers"),
        (["--bits", "5"], "2, 3, 4 or 8"),
        # issue 18: refused before any work, not a raw error or an n/a table
        (["--stream-steps", "-5", "--protocols", "streaming"], "--stream-steps: expected a "
                                                                "positive integer, got '-5'"),
        (["--seed-continuation", "0"], "--seed-continuation: expected a positive integer"),
        (["--threads", "-1"], "--threads: expected a positive integer"),
        (["--block", "0"], "--block: expected a positive integer"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_dir, text_file, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:  # argparse-level errors exit directly
        raise SystemExit(
            compare(
                "--model",
                str(tiny_dir),
                "--corpus",
                str(text_file),
                "--out",
                str(tmp_path / "o"),
                *args,
            )
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_model_path_and_empty_corpus(tiny_dir, tmp_path, capsys):
    assert compare("--model", str(tmp_path / "nope"), "--context", "48") == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert (
        compare(
            "--model",
            str(tiny_dir),
            "--corpus",
            str(empty),
            "--context",
            "48",
            "--pipelines",
            "naive4",
        )
        == 2
    )
    assert "is empty" in capsys.readouterr().err
