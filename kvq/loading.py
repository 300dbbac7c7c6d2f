"""Entry points that turn user input into pipelines: ``build``, ``kv``, ``load``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvq.errors import SpecError, shorten
from kvq.kvconfig import KVConfig
from kvq.pipeline import Pipeline
from kvq.spec.files import load_json, load_yaml, read_text

_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def build(spec: str | list | dict | Pipeline) -> Pipeline:
    """One K or V pipeline from a spec string (``"nsep>pchan>int4"``), a preset whose keys and
    values agree (``"naive4"``), a list of steps or a dict."""
    return Pipeline.parse(spec)


def load(path: str | Path) -> KVConfig:
    """A :class:`KVConfig` from a YAML or JSON file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"no such pipeline file: {shorten(str(path))}")
    text = read_text(path)
    data = load_json(text, str(path)) if path.suffix == ".json" else load_yaml(text, str(path))
    if isinstance(data, (str, list)):
        data = {"kv": data}
    from kvq.calibrated import check_layers
    from kvq.codebooks import relative_to

    with relative_to(path.parent):  # codebook files named in the file are relative to it
        cfg = KVConfig.from_dict(data, source=str(path))
    check_layers(cfg, source=shorten(str(path), 300))
    return cfg


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
        try:
            return KVConfig.from_spec(source)
        except SpecError:
            _recipe_hint(source)
            raise
    raise SpecError(f"cannot make a K/V configuration from {type(source).__name__}",
                    suggestion="pass a spec string, preset name, YAML path or dict")


def _recipe_hint(name: str) -> None:
    """Raise a SpecError that says how to calibrate when ``name`` is a calibration recipe."""
    from kvq.presets import RECIPES

    if name.strip() in RECIPES:
        name = name.strip()
        raise SpecError(f"{name!r} is a calibration recipe, not a preset: its parameters are "
                        "fitted to a model", suggestion=f"run `kvq calibrate --recipe {name} --out "
                        f"{name}.yaml` and use {name}.yaml")
