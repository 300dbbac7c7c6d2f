"""Calibration files: one safetensors file of fitted tensors, referenced by calibrated steps.

A reference is ``FILE#NAME`` (``calibrated.safetensors#L3.k``: layer 3, keys). The file holds
fp32 tensors named ``NAME`` (``nuq`` levels) or ``NAME.<suffix>`` (``klt``/``alloc``/static
scales) and string metadata describing what it was fitted for::

    format: kvq-codebooks   version: 1   bits: 3   num_layers: 30   kv_heads: 3   head_dim: 64
    model: SmolLM2-135M-Instruct   corpus: shakespeare:calib   ...

A relative ``FILE`` is resolved against the directory of the YAML/JSON file being loaded
(:func:`kvq.load`), else the working directory. :func:`snapshot` is the one place that reads a
file: it reads the bytes once, hashes them (sha256) and parses them into an :class:`Artifact`
that the steps keep (a file that changes later is never read again by them). Every problem
(missing file, not a regular file, not a codebook file, content changed since it was pinned) is
a :class:`~kvq.errors.SpecError` that names the file and the fix. The public readers
(:func:`read`, :func:`levels`, :func:`static_scales`) return copies: editing them in place
changes nothing else.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvq.errors import SpecError, shorten

FORMAT = "kvq-codebooks"
VERSION = "1"
MAX_BYTES = 4 << 30  # a calibration file of a 70B model is well under 1 GiB
_BASE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("kvq_codebook_base",
                                                                   default=None)
_FIX = "run `kvq calibrate` again to write a fresh file"


@contextlib.contextmanager
def relative_to(directory: str | Path):
    """Resolve relative codebook files against ``directory`` within the block (used by load)."""
    token = _BASE.set(Path(directory))
    try:
        yield
    finally:
        _BASE.reset(token)


def split_ref(ref: str) -> tuple[str, str]:
    """``"FILE#NAME"`` -> (FILE, NAME); raises SpecError for anything else."""
    file, sep, name = ref.rpartition("#")
    if not sep or not file or not name:
        raise SpecError(f"codebook reference {ref[:200]!r} is not FILE#NAME",
                        suggestion="write e.g. nuq(3,source=calibrated.safetensors#L0.k)")
    return file, name


def resolve(file: str) -> Path:
    """Absolute path of a codebook file named in a spec (see the module docstring)."""
    try:
        path = Path(file).expanduser()
        if not path.is_absolute():
            path = (_BASE.get() or Path.cwd()) / path
        return path.resolve()
    except RuntimeError as exc:  # ~nosuchuser, a symlink loop
        raise SpecError(f"codebook file {shorten(file)} cannot be resolved ({str(exc)[:80]})",
                        suggestion="fix the path") from None
    except OSError as exc:
        raise SpecError(f"codebook file {shorten(file)} cannot be resolved "
                        f"({exc.strerror or exc})", suggestion="fix the path") from None


@dataclass(frozen=True, eq=False)
class Artifact:
    """A calibration file as read once: its metadata and tensors (fp32, shared: never modify
    them; :meth:`tensor` keeps one copy per device), and the sha256 of its bytes."""

    path: Path
    sha256: str
    meta: dict[str, str]
    tensors: dict[str, torch.Tensor]
    _devices: dict = field(default_factory=dict, repr=False)

    def __eq__(self, other):
        return isinstance(other, Artifact) and (self.path, self.sha256) == (other.path,
                                                                             other.sha256)

    def __hash__(self):
        return hash((self.path, self.sha256))

    def tensor(self, name: str, device=None) -> torch.Tensor:
        """The shared tensor ``name`` on ``device`` (read-only by convention: internal use)."""
        key = (name, str(torch.device(device)) if device is not None else "cpu")
        if key not in self._devices:
            self._devices[key] = self.tensors[name].to(device)
        return self._devices[key]


def snapshot(path: Path, sha256: str | None = None) -> Artifact:
    """The :class:`Artifact` of ``path`` (read once per content), checked against ``sha256``
    when given (the hash a YAML or spec recorded)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SpecError(f"codebook file {_show(path)} does not exist",
                        suggestion="run `kvq calibrate` to create it, or fix the path (relative "
                                   "paths are relative to the YAML file)") from None
    except OSError as exc:
        raise SpecError(f"codebook file {_show(path)} cannot be read "
                        f"({exc.strerror or exc})", suggestion="fix the path") from None
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(f"codebook file {_show(path)} is {_kind(st.st_mode)}, not a regular file",
                        suggestion="name the .safetensors file written by `kvq calibrate`")
    if st.st_size > MAX_BYTES:
        raise SpecError(f"codebook file {_show(path)} has {st.st_size} bytes, more than a "
                        f"calibration file holds ({MAX_BYTES})", suggestion=_FIX)
    key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    art = _CACHE.get(key)
    if art is None:
        art = _parse(path)
        _CACHE[key] = art
        while len(_CACHE) > 16:
            _CACHE.popitem(last=False)
    if sha256 is not None and art.sha256 != sha256:
        raise SpecError(f"codebook file {_show(path)} changed since it was recorded (sha256 "
                        f"{art.sha256[:12]}..., recorded {shorten(sha256, 16)})",
                        suggestion="calibrate again, or restore the file the config was "
                                   "written with")
    return art


_CACHE: OrderedDict[tuple, Artifact] = OrderedDict()


def _show(path) -> str:
    """A path for a message (bounded)."""
    return shorten(str(path), 300)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _parse(path: Path) -> Artifact:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = path.read_bytes()
        tensors = load(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        meta = dict(header.get("__metadata__") or {})
    except (SafetensorError, OSError, ValueError, TypeError, AttributeError) as exc:
        raise SpecError(f"codebook file {_show(path)} is not a readable safetensors file "
                        f"({str(exc)[:120]})", suggestion=_FIX) from None
    if meta.get("format") != FORMAT:
        raise SpecError(f"{_show(path)} is a safetensors file but not a kvq codebook file "
                        f"(metadata format={shorten(meta.get('format'), 40)})", suggestion=_FIX)
    if meta.get("version") != VERSION:
        raise SpecError(f"codebook file {_show(path)} has version "
                        f"{shorten(meta.get('version'), 20)}; this kvq reads version {VERSION}",
                        suggestion=_FIX)
    tensors = {k: v.to(torch.float32) for k, v in tensors.items()}
    return Artifact(path, hashlib.sha256(data).hexdigest(), meta, tensors)


def read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a codebook file: copies, safe to modify."""
    art = snapshot(Path(path))
    return dict(art.meta), {k: v.clone() for k, v in art.tensors.items()}


def checked_levels(art: Artifact, name: str, bits: int) -> torch.Tensor:
    """The shared fp32 levels (2**bits,) ``name`` of ``art``, checked against ``bits``."""
    if name not in art.tensors:
        known = ", ".join(sorted(art.tensors)[:6]) + (", ..." if len(art.tensors) > 6 else "")
        raise SpecError(f"codebook {shorten(name)} is not in {_show(art.path)}",
                        suggestion=f"it holds {known or 'nothing'}")
    lv = art.tensors[name]
    n = 2**bits
    if lv.dim() != 1 or lv.numel() != n:
        fitted = max(lv.numel(), 1).bit_length() - 1
        raise SpecError(f"codebook {name!r} in {_show(art.path)} has {lv.numel()} levels, but "
                        f"{bits} bits need {n} (it was calibrated for {fitted} bits)",
                        suggestion=f"use nuq({fitted},...) or calibrate at {bits} bits")
    if not (torch.isfinite(lv).all() and (lv[1:] > lv[:-1]).all()):
        raise SpecError(f"codebook {name!r} in {_show(art.path)} is not finite and strictly "
                        "increasing (corrupt file?)", suggestion=_FIX)
    return lv


def levels(ref: str, bits: int) -> tuple[Path, dict[str, str], torch.Tensor]:
    """(file, metadata, levels fp32 (2**bits,), a copy) for ``ref``, checked against ``bits``."""
    file, name = split_ref(ref)
    art = snapshot(resolve(file))
    return art.path, dict(art.meta), checked_levels(art, name, bits).clone()


def checked_static(art: Artifact, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared (zero, scale) fp32 (kv_heads, head_dim) ``NAME.zero`` / ``NAME.scale``."""
    zero, scale = art.tensors.get(f"{name}.zero"), art.tensors.get(f"{name}.scale")
    if zero is None or scale is None:
        raise SpecError(f"codebook file {_show(art.path)} has no static scales for {name!r}",
                        suggestion="use scale=minmax, or calibrate a recipe with "
                                   "nuq(b,scale=static)")
    if zero.dim() != 2 or zero.shape != scale.shape or not bool((scale > 0).all()) \
            or not bool(torch.isfinite(zero).all() & torch.isfinite(scale).all()):
        raise SpecError(f"static scales of {name!r} in {_show(art.path)} are not finite positive "
                        "(kv_heads, head_dim) tensors (corrupt file?)", suggestion=_FIX)
    return zero, scale


def static_scales(path: Path, name: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero, scale) fp32 (kv_heads, head_dim) stored as ``NAME.zero`` / ``NAME.scale``
    (copies)."""
    zero, scale = checked_static(snapshot(Path(path)), name)
    return zero.to(device, copy=True), scale.to(device, copy=True)


def encode(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """The bytes of a codebook file: fp32 tensors and string metadata (format/version added)."""
    from safetensors.torch import save

    data = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in tensors.items()}
    return save(data, metadata={**{k: str(v) for k, v in meta.items()}, "format": FORMAT,
                                "version": VERSION})


def write(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write a codebook file atomically (see :func:`encode` and
    :func:`kvq.spec.files.write_atomic`)."""
    from kvq.spec.files import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, encode(tensors, meta))
    return path
