"""KVConfig: separate key and value pipelines with per-layer overrides (the YAML file format).

.. code-block:: yaml

    name: mixed
    keys: ptok>int4                 # or a list of step dicts
    values: ptok>int4
    layers:
      0: {keys: nsep>pchan>int4, values: nsep>pchan>int4}
      # or {kv: nsep>pchan>int4} for both

``kv:`` at the top sets keys and values at once; a preset name works wherever a spec does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from kvq.errors import KVQError, SpecError
from kvq.pipeline import Pipeline, unwrap


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
    return data


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


class KVConfig(BaseModel):
    """Key and value pipelines for a whole model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = None
    keys: Pipeline
    values: Pipeline
    layers: dict[int, LayerOverride] = {}

    @model_validator(mode="before")
    @classmethod
    def _kv(cls, data: Any) -> Any:
        return _split_kv(data)

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
        if not ({"keys", "values", "kv"} & set(data)):
            raise SpecError(f"{source}: no pipeline given",
                            suggestion="add 'kv: nsep>pchan>int4' or 'keys:' and 'values:'")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = unwrap(exc)
            raise type(err)(f"{source}: {err}") if isinstance(err, SpecError) else err from None

    # access --------------------------------------------------------------------------------------
    def for_layer(self, layer: int) -> tuple[Pipeline, Pipeline]:
        """(keys, values) pipelines of ``layer`` after overrides."""
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
        take ``head_dim`` (e.g. a channel group that does not divide it, or a codebook fitted
        for another model)."""
        missing = sorted(i for i in self.layers if not 0 <= i < num_layers)
        if missing:
            raise SpecError(f"per-layer override for layer {missing[0]}, but the model has "
                            f"{num_layers} layers (0..{num_layers - 1})")
        import torch

        probe = torch.Size([1, 1, 2, head_dim])
        for p in self.pipelines():
            for step in p.steps:
                step.check_model(num_layers=num_layers, head_dim=head_dim)
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
        if self.keys == self.values and not self.layers:
            return self.keys.to_spec()
        return f"K:{self.keys.to_spec()} V:{self.values.to_spec()}"

    def bits_per_element(self, head_dim: int, seq: int, num_layers: int = 1) -> float:
        """Average over keys, values and layers."""
        total = 0.0
        for layer in range(num_layers):
            k, v = self.for_layer(layer)
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
