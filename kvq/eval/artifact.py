"""The calibration artifact on disk: ``NAME.yaml`` and ``NAME.safetensors``, written together.

:func:`prepare` runs before any calibration work: it refuses an output that could not be written
(a folder named ``x.yaml``, a path under a file, /proc, an unwritable folder) and one that would
overwrite a file kvq did not write (anything that is not a kvq calibration artifact, and any file
inside the model's folder) unless ``force``. :func:`write` then writes both files atomically
(:func:`kvq.spec.files.write_atomic_all`): a failed run leaves neither file changed and no
orphan.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path

from kvq.errors import shorten
from kvq.eval.errors import EvalError

HEADER = "# kvq calibrate:"
_UNSAFE = re.compile(r"[,()=>;#\s]")


def check_name(out: Path) -> None:
    """Refuse an ``out`` that is not NAME.yaml with a NAME a spec reference can hold."""
    if out.suffix not in (".yaml", ".yml"):
        raise EvalError(f"--out {_show(out)} must end in .yaml (the safetensors file is "
                        "written next to it)")
    if _UNSAFE.search(out.stem):
        raise EvalError(f"--out {_show(out)}: the file name holds a space or one of , ( ) = > ; "
                        "# which the YAML's references to the .safetensors file cannot hold",
                        )


def prepare(out: Path, model: str | None = None, force: bool = False) -> list[Path]:
    """Check that ``out`` (.yaml) and its .safetensors can be written; create missing parent
    folders and return them (to remove if the run fails)."""
    check_name(out)
    targets = (out, out.with_suffix(".safetensors"))
    protected = _protected(model)
    for path in targets:
        try:
            st = path.lstat()
        except (FileNotFoundError, NotADirectoryError):  # make_folder names what is in the way
            continue
        except OSError as exc:
            raise EvalError(f"--out: cannot use {_show(path)} ({exc.strerror or exc})") from None
        what = _foreign(path, st)
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
            raise EvalError(f"--out: {_show(path)} exists and is {what}; choose another --out")
        if force:
            continue
        inside = [(label, d) for label, d in protected if _inside(path, d)]
        if inside or what:
            why = (f"it is inside {inside[0][0]} {_show(inside[0][1])}" if inside else
                   f"it is {what}")
            raise EvalError(f"--out would overwrite {_show(path)}: {why}; choose another --out "
                            "or pass --force")
    return make_folder(out.parent)


def write(out: Path, yaml_text: str, tensors: bytes) -> None:
    """Write the YAML and its .safetensors atomically, together."""
    from kvq.spec.files import write_atomic_all

    try:
        write_atomic_all([(out.with_suffix(".safetensors"), tensors),
                          (out, yaml_text.encode("utf-8"))])
    except OSError as exc:
        raise EvalError(f"cannot write {_show(out)}: {exc.strerror or exc}; nothing was "
                        "written") from None


def remove_folders(created: list[Path]) -> None:
    """Remove the folders :func:`prepare` created, innermost first, if still empty."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` (and missing parents) and check that files can be created in it;
    return the folders created. An :class:`EvalError` names what is in the way."""
    missing = []
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            raise EvalError(f"--out folder {_show(probe)} is a dangling link")
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise EvalError(f"--out folder {_show(folder)} is under {_show(probe)}, which is a file")
    created = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".kvq-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        remove_folders(created)
        raise EvalError(f"--out folder {_show(folder)} is not writable "
                        f"({exc.strerror or exc})") from None
    return created


def _foreign(path: Path, st: os.stat_result) -> str:
    """'' when ``path`` is a kvq calibration file, else what it is (for messages)."""
    try:
        st = path.stat() if stat.S_ISLNK(st.st_mode) else st
    except OSError:
        return "a dangling link"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    try:
        with open(path, "rb") as f:
            if path.suffix == ".safetensors":
                return "" if _is_codebook_file(f) else "not a kvq calibration file"
            first = f.read(len(HEADER))
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return "" if first == HEADER.encode() else "not a YAML written by kvq calibrate"


def _is_codebook_file(f) -> bool:
    from kvq.codebooks import FORMAT

    n = int.from_bytes(f.read(8), "little")
    if not 0 < n <= 100 << 20:
        return False
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(header, dict) and (header.get("__metadata__") or {}).get("format") == FORMAT


def _protected(model: str | None) -> list[tuple[str, Path]]:
    """Folders whose existing files are never overwritten without --force: the local --model
    folder (the folder of a .gguf file) and kvq's asset cache (the default model lives there)."""
    from kvq.eval.assets import cache_dir

    out = []
    with contextlib.suppress(OSError, RuntimeError):
        out.append(("kvq's asset cache", cache_dir().expanduser().resolve()))
    with contextlib.suppress(OSError, RuntimeError):
        path = Path(model).expanduser().resolve() if model else None
        if path is not None and (path.is_dir() or path.is_file()):
            out.insert(0, ("the --model folder", path if path.is_dir() else path.parent))
    return out


def _inside(path: Path, folder: Path) -> bool:
    with contextlib.suppress(OSError, RuntimeError):
        return path.parent.resolve().is_relative_to(folder)
    return False


def _show(path) -> str:
    return shorten(str(path), 200)
