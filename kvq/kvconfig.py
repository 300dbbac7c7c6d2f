"""KVConfig: separate key and value pipelines with per-layer overrides (the YAML file format).

.. code-block:: yaml

    name: mixed
    keys: ptok>int4                 # or a list of step dicts
    values: ptok>int4
    layers:
      0: {keys: nsep>pchan>int4, values: nsep>pchan>int4}
      # or {kv: nsep>pchan>int4} for both
    skip: [0, 1, -2, -1]            # layers kept unquantized; negative counts from the end

``kv:`` at the top sets keys and values at once; a preset name works wherever a spec does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from kvq.errors import KVQError, SpecError, shorten
from kvq.pipeline import KVQModelMeta, Pipeline, parse_cached, unwrap


def _split_kv(data: Any) -> Any:
    """Expand ``kv:`` into keys and values; a preset name in ``keys:``/``values:`` gives the
    preset's pipeline for that role (``values: kivi2`` -> KIVI's value pipeline)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    if "kv" in data:
        both = data.pop("kv")
        data.setdefault("keys", both)
        data.setdefault("values", both)
    from kvq.registry import PRESETS

    for role in ("keys", "values"):
        value = data.get(role)
        if isinstance(value, str) and value.strip() in PRESETS:
            data[role] = getattr(PRESETS.get(value.strip())(), role)
        elif isinstance(value, str):
            data[role] = parse_cached(value)
    return data


def _layer_key(key: Any) -> int:
    """A layer number from an int or a decimal string; ``True``, ``1.5`` or ``"01"`` refused."""
    if isinstance(key, str) and key.isascii() and key.isdigit() and str(int(key)) == key:
        return int(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    raise SpecError(f"layer key {shorten(key)} is not a layer number",
                    suggestion="write layers as integers: 0, 1, 2, ...")


class LayerOverride(BaseModel):
    """Pipelines replacing the defaults on one layer (either may be left out)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keys: Pipeline | None = None
    values: Pipeline | None = None

    @model_validator(mode="before")
    @classmethod
    def _kv(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"kv": data}
        return _split_kv(data)


class KVConfig(BaseModel, metaclass=KVQModelMeta):
    """Key and value pipelines for a whole model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = None
    keys: Pipeline
    values: Pipeline
    layers: dict[int, LayerOverride] = {}
    skip: tuple[int, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _kv(cls, data: Any) -> Any:
        data = _split_kv(data)
        if isinstance(data, dict) and isinstance(data.get("layers"), dict):
            data["layers"] = {_layer_key(k): v for k, v in data["layers"].items()}
        return data

    @model_validator(mode="after")
    def _skip_once(self) -> KVConfig:
        twice = sorted({i for i in self.skip if self.skip.count(i) > 1})
        if twice:
            raise SpecError(f"skip lists layer {twice[0]} twice", suggestion="list each layer once")
        return self

    # construction ------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: str, name: str | None = None) -> KVConfig:
        """The same pipeline for keys and values (a preset name gives the preset)."""
        from kvq.registry import PRESETS

        if spec.strip() in PRESETS:
            return PRESETS.get(spec.strip())()
        p = Pipeline.parse(spec)
        return cls(name=name or p.to_spec(), keys=p, values=p)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> KVConfig:
        if not isinstance(data, dict):
            raise SpecError(f"{source}: expected a mapping with keys/values (or kv), "
                            f"got {type(data).__name__}")
        if not all(isinstance(k, str) for k in data):
            bad = next(k for k in data if not isinstance(k, str))
            raise SpecError(f"{source}: key {shorten(bad)} is not a name",
                            suggestion="known keys: name, kv, keys, values, layers")
        if not ({"keys", "values", "kv"} & set(data)):
            raise SpecError(f"{source}: no pipeline given",
                            suggestion="add 'kv: nsep>pchan>int4' or 'keys:' and 'values:'")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = unwrap(exc)
            raise type(err)(f"{source}: {err}") if isinstance(err, SpecError) else err from None

    # access --------------------------------------------------------------------------------------
    def skipped(self, num_layers: int | None = None) -> set[int]:
        """Layer indices kept unquantized, negative ``skip`` entries resolved against
        ``num_layers``; raises :class:`SpecError` for an index out of range (or a negative one
        without ``num_layers``)."""
        if num_layers is None:
            neg = [i for i in self.skip if i < 0]
            if neg:
                raise SpecError(f"skip layer {neg[0]} counts from the end, so the number of "
                                "layers is needed", suggestion="pass num_layers=")
            return set(self.skip)
        bad = [i for i in self.skip if not -num_layers <= i < num_layers]
        if bad:
            raise SpecError(f"skip layer {bad[0]} is out of range for a model with {num_layers} "
                            f"layers", suggestion=f"use 0..{num_layers - 1} or "
                            f"-{num_layers}..-1 (from the end)")
        return {i % num_layers for i in self.skip}

    def for_layer(self, layer: int, num_layers: int | None = None) -> tuple[Pipeline, Pipeline]:
        """(keys, values) pipelines of ``layer`` after ``skip`` and overrides (``num_layers``
        resolves negative ``skip`` entries)."""
        if self.skip and layer in self.skipped(num_layers):
            none = Pipeline.parse("none")
            return none, none
        o = self.layers.get(layer)
        if o is None:
            return self.keys, self.values
        return o.keys or self.keys, o.values or self.values

    def pipelines(self) -> list[Pipeline]:
        out = [self.keys, self.values]
        for o in self.layers.values():
            out += [p for p in (o.keys, o.values) if p is not None]
        return out

    def check(self, num_layers: int, head_dim: int) -> None:
        """Raise :class:`KVQError` if an override names a missing layer or a pipeline can't
        take ``head_dim`` (e.g. a channel group that does not divide it)."""
        missing = sorted(i for i in self.layers if not 0 <= i < num_layers)
        if missing:
            raise SpecError(f"per-layer override for layer {missing[0]}, but the model has "
                            f"{num_layers} layers (0..{num_layers - 1})")
        both = sorted(self.skipped(num_layers) & set(self.layers))
        if both:
            raise SpecError(f"layer {both[0]} is both skipped and overridden",
                            suggestion="drop it from 'skip' or from 'layers'")
        import torch

        probe = torch.Size([1, 1, 2, head_dim])
        for p in self.pipelines():
            if not p.is_identity:
                try:
                    p.granularity.check(probe)
                except KVQError as err:
                    raise SpecError(f"pipeline {p.to_spec()!r} does not fit head_dim {head_dim}: "
                                    f"{err}") from None

    @property
    def label(self) -> str:
        """Short name for tables: the name, or the spec when keys and values agree."""
        if self.name:
            return self.name
        skip = f" skip={list(self.skip)}" if self.skip else ""
        if self.keys == self.values and not self.layers:
            return self.keys.to_spec() + skip
        return f"K:{self.keys.to_spec()} V:{self.values.to_spec()}" + skip

    def bits_per_element(self, head_dim: int, seq: int, num_layers: int = 1) -> float:
        """Average over keys, values and layers (skipped layers count 16 bits: fp16 K/V)."""
        total = 0.0
        for layer in range(num_layers):
            k, v = self.for_layer(layer, num_layers)
            total += k.bits_per_element(head_dim, seq) + v.bits_per_element(head_dim, seq)
        return total / (2 * num_layers)

    # serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data with pipelines as canonical spec strings (what YAML/JSON files hold)."""
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        out["keys"], out["values"] = self.keys.to_spec(), self.values.to_spec()
        if self.layers:
            out["layers"] = {i: {k: p.to_spec() for k, p in (("keys", o.keys), ("values", o.values))
                                 if p is not None} for i, o in sorted(self.layers.items())}
        if self.skip:
            out["skip"] = list(self.skip)
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(self.to_json() if path.suffix == ".json" else self.to_yaml())
