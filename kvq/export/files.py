"""Writing an export into ``--out``: atomically, never over files kvq did not write.

A directory kvq exported into holds :data:`MARKER` listing the files it wrote. ``--out`` must
be missing, empty, or carry that marker (then its listed files are replaced); anything else
needs ``force``. Files are staged in a temporary directory beside ``--out`` and moved in one
rename per file only after every file is staged, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from kvq.errors import KVQError

MARKER = ".kvq-export.json"


def _ours(out: Path) -> set[str]:
    try:
        data = json.loads((out / MARKER).read_text(encoding="utf-8"))
        return {str(n) for n in data["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def check_out(out: Path, force: bool) -> None:
    """Raise :class:`KVQError` unless kvq may write into ``out``."""
    if out.exists() and not out.is_dir():
        raise KVQError(f"--out {str(out)[:200]!r} is a file, not a directory")
    if force or not out.exists():
        return
    present = {p.name for p in out.iterdir()}
    if present and not (out / MARKER).is_file():
        raise KVQError(f"--out {str(out)[:200]!r} is not empty and was not written by kvq "
                       "export; choose another directory or pass --force")


def write(out: Path, files: dict[str, str | bytes], copies: dict[str, Path],
          force: bool = False) -> None:
    """Write ``files`` (name -> content) and ``copies`` (name -> source file) into ``out``."""
    check_out(out, force)
    foreign = {p.name for p in out.iterdir()} - _ours(out) - {MARKER} if out.is_dir() else set()
    clash = sorted(foreign & (set(files) | set(copies)))
    if clash and not force:
        raise KVQError(f"{str(out / clash[0])[:200]!r} exists and was not written by kvq "
                       "export; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".kvq-export-", dir=out.parent))
    try:
        for name, content in files.items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(stage / name, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
                f.write(content)
        for name, src in copies.items():
            shutil.copyfile(src, stage / name)
        names = sorted(set(files) | set(copies))
        (stage / MARKER).write_text(json.dumps({"files": names}, indent=2) + "\n",
                                    encoding="utf-8")
        out.mkdir(exist_ok=True)
        stale = _ours(out) - set(names) - {MARKER}
        for name in [*names, MARKER]:
            os.replace(stage / name, out / name)
        for name in stale:  # written by an earlier export here, not by this one
            if "/" not in name and name not in ("", ".", ".."):
                (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
