"""kvq calibrate / tune / diagnose under careless and hostile input (issue 18): no data loss, no
silent wrong result, one-line errors (exit 2) before the expensive work."""

import json
import os
import shutil
import stat

import pytest
import torch

import kvq
from kvq.cli.main import main

TINY = ["--tokens", "128", "--context", "64", "--block", "16", "--quiet"]


@pytest.fixture(scope="module")
def artifact(tiny_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "k3.yaml"
    assert main(["calibrate", "--model", str(tiny_dir), "--corpus", str(text_file), *TINY,
                 "--out", str(out)]) == 0
    return out


def _err(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines()
             if ln.strip() and "it/s]" not in ln]  # transformers' weight-loading bar aside
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    return err


def test_never_overwrites_the_model_or_foreign_files(tiny_dir, text_file, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    weights = (model / "model.safetensors").read_bytes()
    argv = ["calibrate", "--model", str(model), "--corpus", str(text_file), *TINY]
    assert main([*argv, "--out", str(model / "model.yaml")]) == 2
    assert "inside the --model folder" in _err(capsys)
    assert (model / "model.safetensors").read_bytes() == weights
    assert not (model / "model.yaml").exists()
    mine = tmp_path / "notes.safetensors"
    mine.write_bytes(b"my own data")
    assert main([*argv, "--out", str(tmp_path / "notes.yaml")]) == 2
    assert "not a kvq calibration file" in _err(capsys) and mine.read_bytes() == b"my own data"
    (tmp_path / "todo.yaml").write_text("my: own yaml\n")
    assert main([*argv, "--out", str(tmp_path / "todo.yaml")]) == 2
    assert "not a YAML written by kvq calibrate" in _err(capsys)
    assert main([*argv, "--out", str(tmp_path / "todo.yaml"), "--force"]) == 0
    assert main([*argv, "--out", str(tmp_path / "todo.yaml")]) == 0  # its own artifact: fine


def test_never_overwrites_files_in_the_asset_cache(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    weights = cache / "models" / "SmolLM2-135M-Instruct" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    monkeypatch.setenv("KVQ_CACHE_DIR", str(cache))
    assert main(["calibrate", "--model", "/nonexistent/model", "--out",
                 str(weights.with_suffix(".yaml"))]) == 2
    assert "inside kvq's asset cache" in _err(capsys) and weights.read_bytes() == b"weights"


def test_a_failed_write_leaves_no_orphan(tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    import errno

    from kvq.spec import files

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    out = tmp_path / "new" / "k3.yaml"
    assert main(["calibrate", "--model", str(tiny_dir), "--corpus", str(text_file), *TINY,
                 "--out", str(out)]) == 2
    assert "No space left" in _err(capsys)
    assert not (tmp_path / "new").exists()  # no YAML, no .safetensors, no folder, no temp file


def test_both_files_get_the_same_mode(artifact):
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (artifact, artifact.with_suffix(
        ".safetensors"))}
    assert modes == {0o666 & ~_umask()}


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_yaml_records_the_hash_and_a_changed_file_is_refused(artifact, tmp_path, tiny):
    import hashlib

    from kvq.hf import KVQCache

    digest = hashlib.sha256(artifact.with_suffix(".safetensors").read_bytes()).hexdigest()
    assert artifact.read_text().count(f"sha256={digest}") == 4  # 2 layers x K/V
    for p in (artifact, artifact.with_suffix(".safetensors")):
        shutil.copy(p, tmp_path / p.name)
    yaml, st = tmp_path / artifact.name, tmp_path / artifact.with_suffix(".safetensors").name
    model, _ = tiny
    cfg = kvq.load(yaml)
    ids = torch.randint(3, 200, (1, 48), generator=torch.Generator().manual_seed(0))

    def run(swap_midway: bool):
        cache = KVQCache(cfg, model, residual=0, block=16)
        with torch.no_grad():
            first = model(ids[:, :32], past_key_values=cache).logits
            if swap_midway:  # another calibration lands on the file while the cache is in use
                meta, tensors = kvq.codebooks.read(st)
                kvq.codebooks.write(st, {k: v.flip(0) if v.dim() == 1 else v
                                         for k, v in tensors.items()}, meta)
            second = model(ids[:, 32:], past_key_values=cache).logits
        return first, second

    want = run(False)
    got = run(True)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    with pytest.raises(kvq.SpecError, match="changed since it was recorded"):
        kvq.load(yaml)


def test_kv_heads_of_the_artifact_must_match(artifact, tiny):
    import transformers as tf

    from kvq.hf import KVQCache

    model, _ = tiny
    other = tf.LlamaConfig(**{**model.config.to_dict(), "num_key_value_heads": 4})
    with pytest.raises(kvq.SpecError, match="2 kv heads.*4 kv heads"):
        KVQCache(kvq.load(artifact), other)


def test_lm_eval_overrides_keep_the_artifact_file(artifact, tiny_dir, tmp_path, monkeypatch):
    from kvq.eval.lm_eval_model import KVQLM

    decoy = tmp_path / "cwd"
    decoy.mkdir()
    meta, tensors = kvq.codebooks.read(artifact.with_suffix(".safetensors"))
    kvq.codebooks.write(decoy / artifact.with_suffix(".safetensors").name,
                        {k: v * 0.5 if k.endswith(".k") else v for k, v in tensors.items()}, meta)
    monkeypatch.chdir(decoy)  # a file of the same name in the working directory
    want = kvq.load(artifact).keys.quantizer.levels(16)
    lm = KVQLM(pretrained=str(tiny_dir), kv=str(artifact), sinks=2, key_rope="pre",
               device="cpu")
    assert lm.kv_config.sinks == 2
    assert torch.equal(lm.kv_config.keys.quantizer.levels(16), want)


def test_degenerate_levels_are_refused(tiny, tmp_path):
    from kvq.eval.calibrate import calibrate
    from kvq.eval.capture import Captured

    model, _ = tiny
    const = [torch.ones(1, 2, 64, 16) for _ in range(2)]  # K/V that take one value
    caps = [Captured({"pre": const, "post": const}, const)]
    out = tmp_path / "flat.yaml"
    with pytest.raises(kvq.KVQError, match="collapse"):
        calibrate("kvquant3", out, progress=False, captured=(model, caps), context=64, block=16,
                  sensitivity="none")
    assert list(tmp_path.iterdir()) == []


BAD_CALIBRATE = [
    (["--recipe", "tc3", "--bits", "inf"], "--bits must be positive and at most 16"),
    (["--recipe", "tc3", "--bits", "1e309"], "--bits must be positive and at most 16"),
    (["--recipe", "tc3", "--bits", "nan"], "--bits must be positive and at most 16"),
    (["--threads", "-1"], "--threads must be a positive integer"),
    (["--block", "1", "--context", "1"], "at least 2 tokens"),
    (["--sinks", "64", "--context", "64", "--block", "16"], "leaves no block"),
    (["--sinks", "63", "--context", "64", "--block", "32"], "leaves no block"),
    (["--out", "{tmp}/file.txt/x.yaml"], "which is a file"),
    (["--out", "{tmp}/dir.yaml"], "is a directory"),
    (["--out", "/proc/kvq-x.yaml"], "not writable"),
    (["--out", "/sys/kvq-x.yaml"], "not writable"),
    (["--out", "{tmp}/my file.yaml"], "cannot hold"),
    (["--corpus", "{tmp}/latin1.txt"], "not UTF-8"),
    (["--corpus", "{tmp}/binary.txt"], "NUL bytes"),
    (["--corpus", "{tmp}/deep.json"], "nested too deeply"),
]


def _files(tmp):
    (tmp / "file.txt").write_text("x")
    (tmp / "dir.yaml").mkdir()
    (tmp / "latin1.txt").write_bytes("Now is the winter of our discontent, señor".encode("latin-1"))
    (tmp / "binary.txt").write_bytes(b"text\x00\x01\x02" * 10)
    (tmp / "deep.json").write_text("[" * 100_000 + "]" * 100_000)


@pytest.mark.parametrize("argv, message", BAD_CALIBRATE)
def test_calibrate_refuses_before_loading_a_model(argv, message, tmp_path, capsys):
    _files(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["calibrate", "--model", "/nonexistent/model", *argv]) == 2
    assert message in _err(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_missing_out_folder_is_created_and_removed_when_the_run_fails(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "x.yaml"
    assert main(["calibrate", "--model", "/nonexistent/model", "--out", str(out)]) == 2
    assert "model path" in _err(capsys) and not (tmp_path / "a").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["calibrate", "diagnose"])
def test_cuda_without_cuda(command, capsys):
    assert main([command, "--model", "/nonexistent/model", "--device", "cuda"]) == 2
    assert "CUDA is not available" in _err(capsys)


@pytest.mark.parametrize("command", ["calibrate", "diagnose"])
def test_context_beyond_the_model_maximum(command, tiny_dir, text_file, tmp_path, capsys):
    argv = [command, "--model", str(tiny_dir), "--corpus", str(text_file), "--context", "512",
            "--quiet", "--out", str(tmp_path / ("x.yaml" if command == "calibrate" else "d"))]
    assert main(argv) == 2
    assert "longer than the model's maximum of 256 tokens" in _err(capsys)
    assert not (tmp_path / "x.yaml").exists() and not (tmp_path / "x.safetensors").exists()


def _diagnosis(tmp, data) -> str:
    path = tmp / "diag.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["--bits", "inf"], "--bits must be positive and at most 16"),
    (["--bits", "1e309"], "--bits must be positive and at most 16"),
    (["--bits", "3", "--threads", "-1"], "--threads must be a positive integer"),
    (["--bits", "3", "--out", "{tmp}/diag.json/x.yaml"], "which is a file"),
    (["--bits", "3", "--diagnosis", "{tmp}/deep.json"], "nested"),
    (["--bits", "3", "--diagnosis", "{tmp}/diag.json"], "no 'model'"),
    (["--bits", "3", "--diagnosis", "{tmp}/latin1.json"], "not UTF-8"),
    (["--bits", "3", "--diagnosis", "{tmp}/diag.json", "--model", "x"], "--model would change"),
    (["--bits", "3", "--diagnosis", "{tmp}/diag.json", "--pipelines", "int4"],
     "--pipelines would change"),
])
def test_tune_refuses_before_any_work(argv, message, tmp_path, capsys):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "diag.json").write_text(json.dumps({"layers": [], "settings": {"block": 32}}))
    (tmp_path / "latin1.json").write_bytes(b'{"model": "\xe9"}')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--diagnosis" not in argv:
        argv += ["--model", "/nonexistent/model"]
    assert main(["tune", *argv]) == 2
    assert message in _err(capsys)


def test_diagnose_refuses_before_loading_a_model(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for argv, message in ((["--threads", "-1"], "--threads must be a positive integer"),
                          (["--out", str(tmp_path / "file" / "d")], "which is a file"),
                          (["--out", "/proc/kvq-diag"], "not writable")):
        assert main(["diagnose", "--model", "/nonexistent/model", *argv]) == 2
        assert message in _err(capsys)
