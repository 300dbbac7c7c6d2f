"""Reading and writing pipeline files safely: strict UTF-8, a YAML subset without aliases, no
duplicate keys, atomic writes.

Pipeline files are small, so kvq accepts only what they need: YAML without anchors/aliases
(an alias bomb expands a few hundred bytes into billions of nodes), mapping keys that are
strings or integers (``true:`` or ``1.5:`` as a layer key is a mistake, not layer 1), each key
once (YAML and JSON would otherwise keep the last one silently) and at most
:data:`MAX_DEPTH` levels of nesting. Every violation is a :class:`SpecError` naming the line.
The C loader (libyaml) is used when PyYAML has it. :func:`write_atomic` writes every file kvq
produces (YAML configs, calibration files): a reader sees the old file or the whole new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from kvq.errors import SpecError, shorten

MAX_DEPTH = 64


def read_text(path: Path) -> str:
    """The file as UTF-8 text; a clear :class:`SpecError` for other encodings."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise SpecError(f"{path} is not UTF-8 text (byte {exc.start}, line {line}: "
                        f"{shorten(data[exc.start:exc.start + 4])})",
                        suggestion="save the pipeline file as UTF-8") from None


def load_json(text: str, source: str) -> Any:
    """JSON with duplicate keys and deep nesting refused."""

    def pairs(items: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for key, value in items:
            if key in out:
                raise SpecError(f"duplicate key {shorten(key)} in {source}",
                                suggestion="give each key once")
            out[key] = value
        return out

    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise SpecError(f"malformed JSON in {source} at line {exc.lineno}, column {exc.colno}: "
                        f"{exc.msg}") from None
    except RecursionError:
        raise SpecError(f"{source} is nested too deeply") from None
    _check_depth(data, source)
    return data


def load_yaml(text: str, source: str) -> Any:
    """YAML through :func:`_loader` (C when available), composed and checked before use."""
    import yaml

    loader = _loader()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_tree(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"malformed YAML in {source}{where}: {problem[:200]}") from None
    except RecursionError:
        raise SpecError(f"{source} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    finally:
        loader.dispose()


def _loader():
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_tree(root, source: str) -> None:
    """Walk the composed node graph (iteratively): no node reached twice (an alias), at most
    MAX_DEPTH levels, mapping keys unique and plain strings or integers."""
    import yaml

    seen: set[int] = set()
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        line = node.start_mark.line + 1
        if id(node) in seen:
            raise SpecError(f"YAML alias of the anchor at line {line} of {source}: kvq pipeline "
                            "files do not allow anchors and aliases",
                            suggestion="write the value out")
        seen.add(id(node))
        if depth > MAX_DEPTH:
            raise SpecError(f"{source} is nested more than {MAX_DEPTH} levels deep "
                            f"(line {line})")
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                kline = key.start_mark.line + 1
                if not isinstance(key, yaml.ScalarNode) or key.tag not in (
                        "tag:yaml.org,2002:str", "tag:yaml.org,2002:int"):
                    shown = key.value if isinstance(key, yaml.ScalarNode) else key.id
                    raise SpecError(f"key {shorten(shown)} at line {kline} of {source} is not "
                                    "a name or an integer",
                                    suggestion="layer keys are integers (0, 1, ...); quote names")
                canon = key.value if key.tag.endswith("str") else str(_yaml_int(key.value))
                if canon in keys:
                    raise SpecError(f"duplicate key {shorten(key.value)} at line {kline} of "
                                    f"{source}", suggestion="give each key once")
                keys.add(canon)
                stack.append((value, depth + 1))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)


def _yaml_int(text: str) -> int | str:
    try:
        return int(text.replace("_", ""), 0)
    except ValueError:
        return text


def _check_depth(data: Any, source: str) -> None:
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SpecError(f"{source} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`write_atomic_all`)."""
    write_atomic_all([(Path(path), data)])


def write_atomic_all(files: list[tuple[Path, bytes]]) -> None:
    """Write each ``(path, data)`` atomically: every file is first written in full to a
    temporary file in its folder and flushed to disk (fsync); only then are they renamed over
    their paths (``os.replace``), so a failure while writing (a full disk) leaves no file
    changed and no temporary file behind. Each file gets mode ``0o666 & ~umask``, as ``open``
    would give it."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:60]}.",
                                       suffix=".tmp")
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    for folder in {path.parent for _, path in staged}:
        with contextlib.suppress(OSError):  # the renames themselves reach the disk
            dirfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)


def _umask() -> int:
    """The process umask (read from /proc where possible, else set and restored)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
