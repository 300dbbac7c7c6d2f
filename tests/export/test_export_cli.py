"""``kvq export``: exit codes, one-line errors, what is written into --out and what never is."""

from __future__ import annotations

import json

import pytest

from kvq.cli.main import main
from kvq.export import files


def run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    try:
        code = main(["export", *map(str, argv)])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_exact_export_writes_files(capsys, tiny_dir, tmp_path):
    out = tmp_path / "vllm"
    code, text, _ = run(capsys, "turboquant4", "--engine", "vllm", "--model", tiny_dir,
                        "--out", out)
    assert code == 0 and "exact" in text and "--kv-cache-dtype turboquant_4bit_nc" in text
    args = json.loads((out / "vllm_engine_args.json").read_text())
    assert args == {"kv_cache_dtype": "turboquant_4bit_nc"}
    summary = json.loads((out / "export.json").read_text())
    assert summary["exact"] is True and summary["engine"] == "vllm"
    assert not (out / "suggested.yaml").exists()
    marker = json.loads((out / files.MARKER).read_text())
    assert set(marker["files"]) == {p.name for p in out.iterdir()} - {files.MARKER}


def test_refusal_exits_2_one_line_nothing_written(capsys, tiny_dir, tmp_path):
    out = tmp_path / "o"
    code, text, err = run(capsys, "naive4", "--engine", "llama.cpp", "--model", tiny_dir,
                          "--out", out)
    assert code == 2 and text == "" and err.count("\n") == 1
    assert err.startswith("kvq export: error: llama.cpp has no cache type for keys")
    assert "closest: -ctk q4_0 -ctv q4_0" in err and "--suggest" in err
    assert not out.exists()


def test_suggest_writes_the_suggestion(capsys, tiny_dir, tmp_path):
    import kvq

    out = tmp_path / "o"
    code, text, _ = run(capsys, "naive4", "--engine", "llama.cpp", "--model", tiny_dir,
                        "--out", out, "--suggest")
    assert code == 0 and "NOT exact" in text
    cfg = kvq.load(out / "suggested.yaml")
    assert cfg.keys == kvq.build("rot(ggml)>q4_0")
    assert json.loads((out / "export.json").read_text())["exact"] is False


@pytest.mark.parametrize("argv, match", [
    (["naive4", "--engine", "sglang"], "invalid choice"),
    (["nosuchpreset", "--engine", "vllm"], "nosuchpreset"),
    (["naive4", "--engine", "vllm", "--model", "/nonexistent/dir"], "not a model directory"),
])
def test_bad_arguments_exit_2(capsys, tiny_dir, argv, match):
    if "--model" not in argv:
        argv = [*argv, "--model", str(tiny_dir)]
    code, _, err = run(capsys, *argv)
    assert code == 2 and match in err and "Traceback" not in err


def test_foreign_out_refused_untouched_unless_force(capsys, tiny_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("user file")
    (out / "export.json").write_text("user's own")
    code, _, err = run(capsys, "q4_0", "--engine", "llama.cpp", "--model", tiny_dir, "--out", out)
    assert code == 2 and "not written by kvq export" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "notes.txt"]
    assert (out / "export.json").read_text() == "user's own"
    code, _, _ = run(capsys, "q4_0", "--engine", "llama.cpp", "--model", tiny_dir, "--out", out,
                     "--force")
    assert code == 0 and (out / "notes.txt").read_text() == "user file"


def test_out_is_a_file(capsys, tiny_dir, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    code, _, err = run(capsys, "q4_0", "--engine", "llama.cpp", "--model", tiny_dir, "--out", f)
    assert code == 2 and "is a file" in err and f.read_text() == "x"


def test_reexport_replaces_own_files_and_keeps_foreign(capsys, tiny_dir, tmp_path):
    out = tmp_path / "o"
    assert run(capsys, "naive4", "--engine", "vllm", "--model", tiny_dir, "--out", out,
               "--suggest")[0] == 0
    assert (out / "suggested.yaml").exists()
    (out / "mine.txt").write_text("keep")
    assert run(capsys, "turboquant4", "--engine", "vllm", "--model", tiny_dir, "--out", out)[0] \
        == 0
    assert not (out / "suggested.yaml").exists()  # stale file of the earlier export removed
    assert (out / "mine.txt").read_text() == "keep"
    assert json.loads((out / "export.json").read_text())["exact"] is True


def test_clash_with_foreign_file_in_own_dir(tmp_path):
    from kvq.errors import KVQError

    out = tmp_path / "o"
    files.write(out, {"a.json": "{}"}, {})
    (out / "b.json").write_text("user")
    with pytest.raises(KVQError, match="b.json.*not written by kvq"):
        files.write(out, {"a.json": "{}", "b.json": "new"}, {})
    assert (out / "b.json").read_text() == "user"


def test_python_api_matches_cli(tiny_dir):
    from kvq.export import export

    res = export("turboquant-k8v4", "vllm", model=str(tiny_dir))
    assert res.exact and res.engine_args == {"kv_cache_dtype": "turboquant_k8v4"}


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(OSError):
        files.write(out, {"a.json": "{}"}, {"weights.safetensors": tmp_path / "missing"})
    assert not out.exists() and list(tmp_path.iterdir()) == []
