"""The kvq CLI: list, explain, validate, schema; bad input exits 2 with one line, no traceback."""

import json
import subprocess
import sys

import pytest

from kvq.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_explain_seed_method(capsys):
    code, out, _ = run(capsys, "explain", "nsep>pchan>int4")
    assert code == 0
    assert "bits/element 4.129" in out
    assert "nsep" in out and "pchan" in out and "int4" in out


def test_explain_file_and_shape(capsys, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("keys: ptok>int4\nvalues: ptok>int4\nlayers:\n  0: {kv: nsep>pchan>int4}\n")
    code, out, _ = run(capsys, "explain", str(f), "--head-dim", "64", "--seq", "1024",
                       "--layers", "30", "--heads", "3")
    assert code == 0 and "layer 0 keys: nsep>pchan>int4" in out and "total K+V" in out


def test_list(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for word in ("nsep", "pchan", "int3", "torch", "triton", "nsep-pchan4", "kivi2", "builtins"):
        assert word in out


def test_validate(capsys, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("kv: nsep>pchan>int4\n")
    code, out, _ = run(capsys, "validate", str(good))
    assert code == 0 and out.startswith("ok")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kv: nsep>pchan>int7\n")
    code, _, err = run(capsys, "validate", str(good), str(bad))
    assert code == 2 and "bit width 7" in err and len(err.strip().splitlines()) == 1


def test_schema(capsys):
    code, out, _ = run(capsys, "schema")
    assert code == 0 and "NormSeparation" in json.loads(out)["$defs"]


@pytest.mark.parametrize("argv, words", [
    (["explain", "nsep>pchan>int9"], ["bit width 9"]),
    (["explain", "nsepp>int4"], ["did you mean 'nsep'"]),
    (["explain", "int4", "--head-dim", "0"], ["--head-dim must be at least 1"]),
    (["explain", "group(64)>int4", "--head-dim", "80"], ["does not divide head_dim 80"]),
    (["validate", "missing.yaml"], ["no such pipeline file"]),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, words):
    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err


@pytest.mark.parametrize("argv, words", [
    (["explain", "nsep>pchan>int9"], ["bit width 9"]),
    (["frobnicate"], ["invalid choice"]),
])
def test_installed_command_exits_2_without_traceback(argv, words):
    proc = subprocess.run([sys.executable, "-m", "kvq.cli.main", *argv], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr
