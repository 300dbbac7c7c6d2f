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

Keys can be quantized before the rotary embedding, and the first tokens kept exact
(docs/pre-rope-and-sinks.md):

.. code-block:: yaml

    keys: {rope: pre, pipeline: pchan>int3}   # rope: post (default) | pre; also in layers:
    values: ptok>int3
    sinks: 1                                  # first real token of each sequence kept exact
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from kvq.errors import KVQError, SpecError, shorten
from kvq.pipeline import KVQModelMeta, Pipeline, parse_cached, unwrap

KeyRope = Literal["post", "pre"]
_ROPE_FORM = "keys: {rope: pre, pipeline: pchan>int3}"


def _split_kv(data: Any, top: bool) -> Any:
    """Expand ``kv:`` into keys and values and ``keys: {rope, pipeline}`` into ``key_rope`` and
    ``keys``; a preset name in ``keys:``/``values:`` gives the preset's pipeline for that role
    (``values: kivi2`` -> KIVI's value pipeline; ``keys:`` also takes the preset's key rope)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    if "kv" in data:
        both = data.pop("kv")
        if isinstance(both, dict) and "rope" in both:  # rope is a key option: values get the rest
            data.setdefault("keys", both)
            both = both.get("pipeline")
        data.setdefault("keys", both)
        data.setdefault("values", both)
    keys = data.get("keys")
    if isinstance(keys, dict) and ({"rope", "pipeline"} & set(keys)):
        extra = sorted(set(keys) - {"rope", "pipeline"})
        if extra:
            raise SpecError(f"keys: unknown option {extra[0]!r}; expected {_ROPE_FORM}")
        if "rope" in keys:
            if keys["rope"] not in ("pre", "post"):
                raise SpecError(f"keys: rope: {str(keys['rope'])[:20]!r} is neither 'pre' nor "
                                "'post'", suggestion=_ROPE_FORM)
            if data.get("key_rope", keys["rope"]) != keys["rope"]:
                raise SpecError(f"key_rope: {data['key_rope']!r} contradicts keys: rope: "
                                f"{keys['rope']!r}", suggestion="give the rope once")
            data["key_rope"] = keys["rope"]
        if "pipeline" in keys:
            data["keys"] = keys["pipeline"]
        elif top:
            raise SpecError("keys: {rope: ...} without a pipeline", suggestion=_ROPE_FORM)
        else:
            data.pop("keys")
    values = data.get("values")
    if isinstance(values, dict) and "rope" in values:
        raise SpecError("values: 'rope' is a key option (values carry no rotary embedding)",
                        suggestion=_ROPE_FORM)
    from kvq.registry import PRESETS

    for role in ("keys", "values"):
        value = data.get(role)
        if isinstance(value, str) and value.strip() in PRESETS:
            preset = PRESETS.get(value.strip())()
            data[role] = getattr(preset, role)
            if role == "keys" and preset.key_rope != "post":
                data.setdefault("key_rope", preset.key_rope)
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
    """Pipelines (and key rope) replacing the defaults on one layer (any may be left out)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keys: Pipeline | None = None
    values: Pipeline | None = None
    key_rope: KeyRope | None = None

    @model_validator(mode="before")
    @classmethod
    def _kv(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"kv": data}
        return _split_kv(data, top=False)


class KVConfig(BaseModel, metaclass=KVQModelMeta):
    """Key and value pipelines for a whole model.

    ``key_rope``: ``"post"`` (default) quantizes keys as the model hands them to the cache, after
    the rotary embedding; ``"pre"`` quantizes them before it (the cache undoes and redoes RoPE).
    ``sinks``: the first ``sinks`` real tokens of every sequence are kept exact.
    ``skip``: layers kept unquantized (negative indices count from the end).
    ``skip_limit="half"``: vLLM's boundary rule (TurboQuant's ``get_boundary_skip_layers``
    never skips more than half): an entry ``i >= 0`` applies only when ``i < num_layers // 2``,
    an entry ``-j`` only when ``j <= num_layers // 2``; on models with 4 or more layers nothing
    changes, with 3 layers ``skip=[0, 1, -2, -1]`` keeps [0, 2], with 1 layer nothing.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = None
    keys: Pipeline
    values: Pipeline
    key_rope: KeyRope = "post"
    sinks: StrictInt = Field(default=0, ge=0)  # a bool or 1.0 is no token count
    layers: dict[int, LayerOverride] = {}
    skip: tuple[StrictInt, ...] = ()
    skip_limit: Literal["none", "half"] = "none"

    @model_validator(mode="before")
    @classmethod
    def _kv(cls, data: Any) -> Any:
        data = _split_kv(data, top=True)
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
        skip = self.skip
        if self.skip_limit == "half":
            half = num_layers // 2
            skip = [i for i in skip if (i < half if i >= 0 else -i <= half)]
        bad = [i for i in skip if not -num_layers <= i < num_layers]
        if bad:
            raise SpecError(f"skip layer {bad[0]} is out of range for a model with {num_layers} "
                            f"layers", suggestion=f"use 0..{num_layers - 1} or "
                            f"-{num_layers}..-1 (from the end)")
        return {i % num_layers for i in skip}

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

    def key_rope_for(self, layer: int) -> KeyRope:
        """``"pre"`` or ``"post"``: where ``layer``'s keys are quantized, after overrides."""
        o = self.layers.get(layer)
        return o.key_rope if o is not None and o.key_rope is not None else self.key_rope

    @property
    def uses_pre_rope(self) -> bool:
        """True if any layer quantizes keys before RoPE."""
        return self.key_rope == "pre" or any(o.key_rope == "pre" for o in self.layers.values())

    def pipelines(self) -> list[Pipeline]:
        out = [self.keys, self.values]
        for o in self.layers.values():
            out += [p for p in (o.keys, o.values) if p is not None]
        return out

    def check(self, num_layers: int, head_dim: int, kv_heads: int | None = None) -> None:
        """Raise :class:`KVQError` if an override names a missing layer or a pipeline can't
        take ``head_dim`` (e.g. a channel group that does not divide it, or a codebook fitted
        for another model: other layers, kv heads or head_dim)."""
        missing = sorted(i for i in self.layers if not 0 <= i < num_layers)
        if missing:
            raise SpecError(f"per-layer override for layer {missing[0]}, but the model has "
                            f"{num_layers} layers (0..{num_layers - 1})")
        both = sorted(self.skipped(num_layers) & set(self.layers))
        if both:
            raise SpecError(f"layer {both[0]} is both skipped and overridden",
                            suggestion="drop it from 'skip' or from 'layers'")
        import inspect

        import torch

        probe = torch.Size([1, 1, 2, head_dim])
        for p in self.pipelines():
            for step in p.steps:
                extra = {"kv_heads": kv_heads} if kv_heads is not None and "kv_heads" in \
                    inspect.signature(step.check_model).parameters else {}
                step.check_model(num_layers=num_layers, head_dim=head_dim, **extra)
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
            base = self.keys.to_spec()
        else:
            base = f"K:{self.keys.to_spec()} V:{self.values.to_spec()}"
        if self.uses_pre_rope:
            base += " K@pre-rope"
        base += f" sinks={self.sinks}" if self.sinks else ""
        return base + (f" skip={list(self.skip)}" if self.skip else "")

    def bits_per_element(self, head_dim: int, seq: int, num_layers: int = 1) -> float:
        """Average over keys, values and layers, for blocks of ``seq`` tokens (skipped layers
        count 16 bits: fp16 K/V); ``sinks`` adds its exact tokens (at 16 bits) spread over the
        ``seq`` tokens."""
        total = 0.0
        for layer in range(num_layers):
            k, v = self.for_layer(layer, num_layers)
            total += k.bits_per_element(head_dim, seq) + v.bits_per_element(head_dim, seq)
        return total / (2 * num_layers) + 16 * min(self.sinks, seq) / seq

    # serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data with pipelines as canonical spec strings (what YAML/JSON files hold)."""
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        out["keys"] = _keys_entry(self.keys, self.key_rope if self.key_rope != "post" else None)
        out["values"] = self.values.to_spec()
        if self.sinks:
            out["sinks"] = self.sinks
        if self.layers:
            out["layers"] = {i: _override_dict(o) for i, o in sorted(self.layers.items())}
        if self.skip:
            out["skip"] = list(self.skip)
        if self.skip_limit != "none":
            out["skip_limit"] = self.skip_limit
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        """Write the YAML (or ``.json``) file atomically. Calibrated steps are written with the
        absolute path and sha256 of the file they were built from."""
        from kvq.spec.files import write_atomic

        path = Path(path)
        text = self.to_json() if path.suffix == ".json" else self.to_yaml()
        try:
            write_atomic(path, text.encode("utf-8"))
        except OSError as exc:
            raise KVQError(f"cannot write {shorten(str(path), 300)}: "
                           f"{exc.strerror or exc}") from None


def _keys_entry(keys: Pipeline | None, rope: str | None) -> Any:
    """``keys:`` as written in files: a spec, or ``{rope, pipeline}`` when the rope is set."""
    if rope is None:
        return keys.to_spec()
    return {"rope": rope} | ({"pipeline": keys.to_spec()} if keys is not None else {})


def _override_dict(o: LayerOverride) -> dict:
    out: dict[str, Any] = {}
    if o.keys is not None or o.key_rope is not None:
        out["keys"] = _keys_entry(o.keys, o.key_rope)
    if o.values is not None:
        out["values"] = o.values.to_spec()
    return out
