"""Calibrated codebook files: one safetensors file of fitted levels, referenced by ``nuq`` steps.

A reference is ``FILE#NAME`` (``calibrated.safetensors#L3.k``: layer 3, keys). The file holds one
fp32 tensor of ``2**bits`` sorted levels per name and string metadata describing what it was
fitted for::

    format: kvq-codebooks   version: 1   bits: 3   num_layers: 30   head_dim: 64
    model: SmolLM2-135M-Instruct   corpus: shakespeare:calib   ...

A relative ``FILE`` is resolved against the directory of the YAML/JSON file being loaded
(:func:`kvq.load`), else the working directory. Every problem (missing file, not a codebook
file, missing name, wrong bit width, unsorted levels) is a :class:`~kvq.errors.SpecError` that
names the file and the fix.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from pathlib import Path

import torch

from kvq.errors import SpecError

FORMAT = "kvq-codebooks"
VERSION = "1"
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
    path = Path(file).expanduser()
    if not path.is_absolute():
        path = (_BASE.get() or Path.cwd()) / path
    return path.resolve()


def read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a codebook file, cached while the file is unchanged."""
    if not path.is_file():
        raise SpecError(f"codebook file {str(path)!r} does not exist",
                        suggestion="run `kvq calibrate` to create it, or fix the path (relative "
                                   "paths are relative to the YAML file)")
    stat = path.stat()
    return _read(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _read(path: Path, _mtime: int, _size: int):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise SpecError(f"codebook file {str(path)!r} is not a readable safetensors file "
                        f"({str(exc)[:120]})", suggestion=_FIX) from None
    if meta.get("format") != FORMAT:
        raise SpecError(f"{str(path)!r} is a safetensors file but not a kvq codebook file "
                        f"(metadata format={meta.get('format')!r})", suggestion=_FIX)
    if meta.get("version") != VERSION:
        raise SpecError(f"codebook file {str(path)!r} has version {meta.get('version')!r}; this "
                        f"kvq reads version {VERSION}", suggestion=_FIX)
    return meta, tensors


def levels(ref: str, bits: int) -> tuple[Path, dict[str, str], torch.Tensor]:
    """(file, metadata, levels fp32 (2**bits,)) for ``ref``, checked against ``bits``."""
    file, name = split_ref(ref)
    path = resolve(file)
    meta, tensors = read(path)
    if name not in tensors:
        known = ", ".join(sorted(tensors)[:6]) + (", ..." if len(tensors) > 6 else "")
        raise SpecError(f"codebook {name!r} is not in {str(path)!r}",
                        suggestion=f"it holds {known or 'nothing'}")
    lv = tensors[name]
    n = 2**bits
    if lv.dim() != 1 or lv.numel() != n:
        fitted = max(lv.numel(), 1).bit_length() - 1
        raise SpecError(f"codebook {name!r} in {str(path)!r} has {lv.numel()} levels, but "
                        f"{bits} bits need {n} (it was calibrated for {fitted} bits)",
                        suggestion=f"use nuq({fitted},...) or calibrate at {bits} bits")
    lv = lv.to(torch.float32)
    if not (torch.isfinite(lv).all() and (lv[1:] > lv[:-1]).all()):
        raise SpecError(f"codebook {name!r} in {str(path)!r} is not finite and strictly "
                        "increasing (corrupt file?)", suggestion=_FIX)
    return path, meta, lv


def static_scales(path: Path, name: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero, scale) fp32 (kv_heads, head_dim) stored as ``NAME.zero`` / ``NAME.scale``."""
    _, tensors = read(path)
    zero, scale = tensors.get(f"{name}.zero"), tensors.get(f"{name}.scale")
    if zero is None or scale is None:
        raise SpecError(f"codebook file {str(path)!r} has no static scales for {name!r}",
                        suggestion="use scale=minmax, or calibrate a recipe with "
                                   "nuq(b,scale=static)")
    if zero.dim() != 2 or zero.shape != scale.shape or not bool((scale > 0).all()) \
            or not bool(torch.isfinite(zero).all() & torch.isfinite(scale).all()):
        raise SpecError(f"static scales of {name!r} in {str(path)!r} are not finite positive "
                        "(kv_heads, head_dim) tensors (corrupt file?)", suggestion=_FIX)
    return zero.float().to(device), scale.float().to(device)


def write(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write fp32 level tensors and string metadata (``format``/``version`` added)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in tensors.items()}
    save_file(data, str(path), metadata={**{k: str(v) for k, v in meta.items()},
                                         "format": FORMAT, "version": VERSION})
    return path
