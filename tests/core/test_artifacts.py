"""Calibration files as a hostile disk sees them: changed, truncated, aliased, foreign, odd paths.

Issue 18: a calibrated step reads its file once when it is built (a snapshot, never read again),
pins its content (sha256) and absolute path so a config written back names the same file, refuses
a file of another geometry, and hands out copies, never the shared tensors.
"""

import errno
import hashlib
import os
import stat

import pytest
import torch

import kvq
from kvq import codebooks
from kvq.testing import kv_like

LEVELS3 = torch.tensor([-0.9, -0.5, -0.22, -0.05, 0.1, 0.3, 0.6, 0.95])
OTHER3 = torch.tensor([-1.0, -0.6, -0.3, -0.1, 0.05, 0.2, 0.5, 1.0])


def _book(path, levels=LEVELS3, heads=2, d=64, seed=0, **meta):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(heads, d, d, generator=g))[0]
    return codebooks.write(path, {
        "a": levels, "a.zero": torch.randn(heads, d, generator=g) * 0.1,
        "a.scale": torch.rand(heads, d, generator=g) + 2.0,
        "a.klt.mean": torch.randn(heads, d, generator=g), "a.klt.basis": basis,
    }, {"model": "unit", "num_layers": 2, "head_dim": d, **meta})


SPECS = ["ptok>nuq(3,source={f}#a)", "nuq(3,scale=static,source={f}#a)",
         "klt(source={f}#a)>ptok>int8"]


@pytest.mark.parametrize("spec", SPECS)
def test_a_file_changed_after_build_is_never_read_again_and_is_refused_later(tmp_path, spec):
    book = _book(tmp_path / "cb.safetensors")
    p = kvq.build(spec.format(f=book))
    x = kv_like(1, 2, 32, 64, seed=1)
    before = p.roundtrip(x.clone())
    _book(book, levels=OTHER3, seed=5)  # replaced on disk while the pipeline is in use
    assert torch.equal(p.roundtrip(x.clone()), before)
    book.write_bytes(b"garbage" * 10)  # even a broken file does not reach a running step
    assert torch.equal(p.roundtrip(x.clone()), before)
    _book(book, levels=OTHER3, seed=5)
    with pytest.raises(kvq.SpecError, match="changed since it was recorded"):
        kvq.build(p.to_spec())  # the spec written back pins the content it was built from


def test_the_recorded_hash_is_checked(tmp_path):
    book = _book(tmp_path / "cb.safetensors")
    digest = hashlib.sha256(book.read_bytes()).hexdigest()
    p = kvq.build(f"ptok>nuq(3,source={book}#a,sha256={digest})")
    assert p.quantizer.sha256 == digest
    with pytest.raises(kvq.SpecError, match="changed since it was recorded"):
        kvq.build(f"ptok>nuq(3,source={book}#a,sha256={'0' * 63}f)")
    with pytest.raises(kvq.SpecError, match="64 lowercase hex"):
        kvq.build(f"ptok>nuq(3,source={book}#a,sha256=abc)")


def test_public_tensors_are_copies(tmp_path):
    book = _book(tmp_path / "cb.safetensors")
    spec = f"pchan>nuq(3,source={book}#a)"
    x = kv_like(1, 2, 32, 64, seed=2)
    want = kvq.build(spec).roundtrip(x.clone())
    codebooks.levels(f"{book}#a", 3)[2].mul_(0.1)
    codebooks.read(book)[1]["a"].mul_(0.1)
    codebooks.static_scales(book, "a")[1].mul_(100)
    step = kvq.build(spec).quantizer
    step.codebook(64).mul_(0.1)
    step.levels(64).mul_(0.1)
    kvq.build(f"nuq(3,scale=static,source={book}#a)").quantizer.static()[0].add_(9)
    kvq.build(f"klt(source={book}#a)>ptok>int8").steps[0].tensor("klt.mean").add_(9)
    assert torch.equal(kvq.build(spec).roundtrip(x.clone()), want)
    static = kvq.build(f"nuq(3,scale=static,source={book}#a)").quantizer
    assert torch.equal(static.static()[1], codebooks.static_scales(book, "a")[1])


def test_minmax_levels_outside_unit_interval_are_refused(tmp_path):
    wide = _book(tmp_path / "wide.safetensors", levels=torch.linspace(-2, 2, 8))
    with pytest.raises(kvq.SpecError, match=r"outside \[-1, 1\]"):
        kvq.build(f"ptok>nuq(3,source={wide}#a)")
    kvq.build(f"nuq(3,scale=static,source={wide}#a)")  # static scaling: any levels


def test_relative_sources_keep_their_file_when_written_back(tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "artifact", tmp_path / "cwd"
    home.mkdir()
    elsewhere.mkdir()
    _book(home / "cb.safetensors")
    _book(elsewhere / "cb.safetensors", levels=OTHER3)  # same name, other content, in the cwd
    (home / "c.yaml").write_text("kv: ptok>nuq(3,source=cb.safetensors#a)\n")
    monkeypatch.chdir(elsewhere)
    cfg = kvq.load(home / "c.yaml")
    assert torch.equal(cfg.keys.quantizer.levels(64), LEVELS3)
    again = kvq.KVConfig.from_dict(cfg.to_dict())
    assert torch.equal(again.keys.quantizer.levels(64), LEVELS3) and again == cfg
    cfg.save(elsewhere / "saved.yaml")
    assert torch.equal(kvq.load(elsewhere / "saved.yaml").keys.quantizer.levels(64), LEVELS3)
    # a file that cannot be named absolutely keeps its relative name, and the hash guards it
    text = cfg.to_dict()["keys"].replace(str(home / "cb.safetensors"), "cb.safetensors")
    with pytest.raises(kvq.SpecError, match="changed since it was recorded"):
        kvq.build(text)  # resolves to the cwd's file of the same name


def test_kv_heads_of_another_model_are_refused(tmp_path):
    from transformers import LlamaConfig

    from kvq.hf import KVQCache

    one = _book(tmp_path / "one.safetensors", heads=1, d=16, kv_heads=1)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, intermediate_size=64, vocab_size=64)
    for spec in (f"klt(source={one}#a)>ptok>int8", f"ptok>nuq(3,source={one}#a)",
                 f"nuq(3,scale=static,source={one}#a)"):
        with pytest.raises(kvq.SpecError, match="1 kv heads.*2 kv heads"):
            KVQCache(spec, cfg)
    KVQCache(f"klt(source={one}#a)>ptok>int8",
             LlamaConfig(**{**cfg.to_dict(), "num_key_value_heads": 1}))


def _per_layer(path, layers=2):
    g = torch.Generator().manual_seed(0)
    tensors = {f"L{i}.{r}": torch.sort(torch.rand(8, generator=g) * 2 - 1).values
               for i in range(layers) for r in "kv"}
    return codebooks.write(path, tensors, {"num_layers": layers, "head_dim": 64})


def test_a_truncated_yaml_is_refused(tmp_path):
    _per_layer(tmp_path / "cal.safetensors", layers=3)
    full = ("keys: ptok>nuq(3,source=cal.safetensors#L0.k)\n"
            "values: ptok>nuq(3,source=cal.safetensors#L0.v)\n"
            "layers:\n"
            "  1:\n    keys: ptok>nuq(3,source=cal.safetensors#L1.k)\n"
            "    values: ptok>nuq(3,source=cal.safetensors#L1.v)\n"
            "  2:\n    keys: ptok>nuq(3,source=cal.safetensors#L2.k)\n"
            "    values: ptok>nuq(3,source=cal.safetensors#L2.v)\n")
    (tmp_path / "full.yaml").write_text(full)
    assert sorted(kvq.load(tmp_path / "full.yaml").layers) == [1, 2]
    cut = full[:full.index("  2:")]  # the disk filled while layer 2 was written
    (tmp_path / "cut.yaml").write_text(cut)
    with pytest.raises(kvq.SpecError, match="layer 2 keys use 'L0.k'.*records 3 layers"):
        kvq.load(tmp_path / "cut.yaml")
    (tmp_path / "skip.yaml").write_text(cut + "skip: [2]\n")  # a skipped layer uses nothing
    kvq.load(tmp_path / "skip.yaml")


def test_writes_are_atomic_and_respect_the_umask(tmp_path, monkeypatch):
    from kvq.spec import files

    old = os.umask(0o027)
    try:
        book = _book(tmp_path / "cb.safetensors")
        assert stat.S_IMODE(book.stat().st_mode) == 0o640
    finally:
        os.umask(old)
    before = book.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        _book(book, levels=OTHER3)
    with pytest.raises(kvq.KVQError, match="No space"):
        kvq.kv("ptok>int4").save(tmp_path / "c.yaml")
    assert book.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "cb.safetensors"]


@pytest.mark.parametrize("make, match", [
    (lambda d: os.symlink(d / "loop.safetensors", d / "loop.safetensors") or
     d / "loop.safetensors", "cannot be resolved"),
    (lambda d: d / ("x" * 5000 + ".safetensors"), "cannot be"),
    (lambda d: "~nosuchuser_kvq/cb.safetensors", "cannot be resolved"),
    (lambda d: os.mkfifo(d / "fifo.safetensors") or d / "fifo.safetensors", "a FIFO"),
    (lambda d: "/dev/zero", "a character device"),
    (lambda d: d, "a directory"),
])
def test_odd_source_paths_give_clean_errors(tmp_path, make, match):
    with pytest.raises(kvq.SpecError, match=match) as info:
        kvq.build(f"ptok>nuq(3,source={make(tmp_path)}#a)")
    assert len(str(info.value)) < 1000 and "does not exist" not in str(info.value)
