"""Entry points that turn user input into pipelines: ``build``, ``kv``, ``load``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvq.errors import SpecError
from kvq.kvconfig import KVConfig
from kvq.pipeline import Pipeline

_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def build(spec: str | list | dict | Pipeline) -> Pipeline:
    """One K or V pipeline from a spec string (``"nsep>pchan>int4"``), a preset whose keys and
    values agree (``"naive4"``), a list of steps or a dict."""
    return Pipeline.parse(spec)


def load(path: str | Path) -> KVConfig:
    """A :class:`KVConfig` from a YAML or JSON file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"no such pipeline file: {str(path)!r}")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"malformed JSON in {path} at line {exc.lineno}, column {exc.colno}: "
                            f"{exc.msg}") from None
    else:
        data = _yaml(text, path)
    if isinstance(data, (str, list)):
        data = {"kv": data}
    from kvq.codebooks import relative_to

    with relative_to(path.parent):  # codebook files named in the file are relative to it
        return KVConfig.from_dict(data, source=str(path))


def kv(source: Any) -> KVConfig:
    """A :class:`KVConfig` from a spec string, preset name, YAML/JSON path, dict, Pipeline
    (used for keys and values) or KVConfig."""
    if isinstance(source, KVConfig):
        return source
    if isinstance(source, Pipeline):
        return KVConfig(keys=source, values=source)
    if isinstance(source, dict):
        return KVConfig.from_dict(source)
    if isinstance(source, Path) or (isinstance(source, str) and source.endswith(_FILE_SUFFIXES)):
        return load(source)
    if isinstance(source, str):
        return KVConfig.from_spec(source)
    raise SpecError(f"cannot make a K/V configuration from {type(source).__name__}",
                    suggestion="pass a spec string, preset name, YAML path or dict")


def _yaml(text: str, path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"malformed YAML in {path}{where}: {problem}") from None
