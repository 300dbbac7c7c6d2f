"""Pipeline: a validated chain of steps for one K or V tensor.

``transforms... > [granularity] > quantizer``. Built from a spec string (``kvq.build``), a
list of steps or a dict; serialises to a canonical spec string, YAML and JSON.
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, SerializeAsAny, ValidationError, model_validator
from pydantic._internal._model_construction import ModelMetaclass

from kvq.errors import KVQError, NumericsError, SpecError, shorten
from kvq.granularity import Granularity
from kvq.quantized import QuantizedTensor
from kvq.quantizers import Quantizer, packed_row_bytes
from kvq.spec import Step, parse
from kvq.spec.build import check_structure, make_step
from kvq.transforms import Transform


class KVQModelMeta(ModelMetaclass):
    """Metaclass of kvq's user-facing models: ``Model(...)`` raises kvq errors, not pydantic's.

    (Overriding ``__init__`` instead would make pydantic call it for nested models too.)
    """

    def __call__(cls, *args: Any, **kwargs: Any):
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as exc:
            raise unwrap(exc) from None


class Pipeline(BaseModel, metaclass=KVQModelMeta):
    """Steps applied left to right on quantize and right to left on dequantize."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: list[SerializeAsAny[Step]]
    check_finite: bool = True

    @model_validator(mode="before")
    @classmethod
    def _coerce(cls, data: Any) -> Any:
        if isinstance(data, str):
            spec, options = _split_options(data)
            return {"steps": _steps_from_spec(spec), **options}
        if isinstance(data, list):
            data = {"steps": data}
        if isinstance(data, dict) and isinstance(data.get("steps"), str):
            spec, options = _split_options(data["steps"])
            data = {**options, **data, "steps": _steps_from_spec(spec)}
        if isinstance(data, dict) and isinstance(data.get("steps"), list):
            data = {**data, "steps": [make_step(s, i) for i, s in enumerate(data["steps"])]}
        return data

    @model_validator(mode="after")
    def _structure(self) -> Pipeline:
        check_structure(self.steps)
        return self

    # construction ------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str | list | dict | Pipeline) -> Pipeline:
        """Build from a spec string, step list or dict; errors are one-line :class:`SpecError`."""
        if isinstance(spec, Pipeline):
            return spec
        if isinstance(spec, str):
            spec, options = _split_options(spec)
            return cls(steps=_steps_from_spec(spec), **options)
        if isinstance(spec, dict) and not all(isinstance(k, str) for k in spec):
            bad = next(k for k in spec if not isinstance(k, str))
            raise SpecError(f"pipeline key {shorten(bad)} is not a name",
                            suggestion="known keys: steps, check_finite")
        try:
            return cls.model_validate(spec)
        except ValidationError as exc:
            raise unwrap(exc) from None

    # structure -----------------------------------------------------------------------------
    @cached_property
    def transforms(self) -> list[Transform]:
        return [s for s in self.steps if s.role == "transform"]  # type: ignore[misc]

    @cached_property
    def granularity(self) -> Granularity:
        found = [s for s in self.steps if s.role == "granularity"]
        return self.quantizer.resolve_granularity(found[0] if found else None)  # type: ignore

    @cached_property
    def quantizer(self) -> Quantizer:
        return self.steps[-1]  # type: ignore[return-value]

    @property
    def bits(self) -> int:
        return self.quantizer.bits

    @property
    def is_identity(self) -> bool:
        """True for the ``none`` quantizer: K/V stored unchanged."""
        return self.quantizer.type == "none"  # type: ignore[attr-defined]

    @property
    def token_axis_stats(self) -> bool:
        """True when some statistic is taken over tokens: stream in blocks, never per token."""
        return self.granularity.token_axis or any(t.token_axis for t in self.transforms)

    @property
    def token_block(self) -> int | None:
        """Tokens per statistic when fixed by the pipeline (e.g. ``group(32,token)``: 32)."""
        return self.granularity.token_block()

    def to_spec(self) -> str:
        """Canonical spec string (round-trips through :func:`kvq.build`, options included:
        ``"ptok>int4; check_finite=false"``)."""
        return self.steps_spec + ("" if self.check_finite else "; check_finite=false")

    @property
    def steps_spec(self) -> str:
        """The steps alone as a spec string: what a :class:`QuantizedTensor` records."""
        return _steps_spec(tuple(self.steps))

    def __str__(self) -> str:
        return self.to_spec()

    # sizes -------------------------------------------------------------------------------------
    def nbytes(self, seq: int, head_dim: int) -> float:
        """Bytes stored for one head's (seq, head_dim) block: codes, norms, scales, zeros."""
        if self.is_identity:
            return seq * head_dim * 2
        code_bits = packed_row_bytes(head_dim, self.bits) * 8 * seq
        meta = sum(t.meta_bits(seq, head_dim) for t in self.transforms)
        meta += self.quantizer.meta_bits(self.granularity.groups(seq, head_dim))
        return (code_bits + meta) / 8

    def bits_per_element(self, head_dim: int, seq: int) -> float:
        """Average stored bits per K/V element, metadata included (16 for ``none`` at fp16)."""
        return self.nbytes(seq, head_dim) * 8 / (seq * head_dim)

    # running -----------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`KVQError` for a wrong rank or dtype, or a shape the steps can't take."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise KVQError(f"expected a (batch, kv_heads, seq, head_dim) tensor, got {shape}")
        if not x.is_floating_point():
            raise KVQError(f"expected a floating-point tensor, got {x.dtype}")
        if x.shape[-2] == 0:
            raise KVQError("cannot quantize an empty sequence (seq=0)")
        if 0 in x.shape:
            raise KVQError(f"cannot quantize an empty tensor of shape {tuple(x.shape)} "
                           "(batch, kv_heads and head_dim must be at least 1)")
        if x.device.type == "meta":
            raise KVQError("cannot quantize a meta tensor (it holds no values); "
                           "materialize it first, e.g. with .to_empty(device='cpu')")
        if not self.is_identity:
            self.granularity.check(x.shape)

    def check_output(self, q: QuantizedTensor, x: torch.Tensor | None = None) -> None:
        """Raise :class:`NumericsError` if the input held NaN/Inf.

        Every floating-point norm, scale and zero is a max/min/sum over its group, so a
        non-finite input element shows up in the (small) metadata: checking it costs nothing.
        Without such metadata (a codebook with no scale, integer-coded scales such as E8M0), the
        input ``x`` itself is checked.
        """
        if self.check_finite and not self.is_identity:
            floats = [m for m in q.meta.values() if m.is_floating_point()]
            shown = floats if floats else ([] if x is None else [x])
            if not all(bool(torch.isfinite(m).all()) for m in shown):
                raise NumericsError("input holds NaN or Inf; kvq refuses to quantize non-finite "
                                    "K/V (fix the model or build the pipeline with "
                                    "check_finite=False)")

    def quantize(self, x: torch.Tensor, backend: str = "auto") -> QuantizedTensor:
        """x: (batch, kv_heads, seq, head_dim) fp32/fp16/bf16 -> bit-packed QuantizedTensor."""
        from kvq.backends import resolve_backend

        self.check_input(x)
        q = resolve_backend(backend, self, x).quantize(self, x)
        self.check_output(q, x)
        if q.codes is x:  # the identity keeps the input: store a copy the caller cannot change
            q.codes = x.clone()
        q.spec = self.steps_spec
        return q

    def dequantize(self, q: QuantizedTensor, backend: str = "auto") -> torch.Tensor:
        """QuantizedTensor -> (batch, kv_heads, seq, head_dim) tensor in the original dtype.

        Raises :class:`KVQError` when ``q`` was quantized by another pipeline. A value that the
        quantization error pushes past the largest finite number of a float16/bfloat16 output
        is saturated to it (the input was finite, so that is closer to it than Inf).
        """
        from kvq.backends import resolve_backend

        if q.spec and q.spec != self.steps_spec:
            raise KVQError(f"these codes were quantized by {shorten(q.spec)}, not "
                           f"{shorten(self.steps_spec)}; dequantize with the pipeline that "
                           "quantized them")
        y = resolve_backend(backend, self, q.codes).dequantize(self, q)
        if self.check_finite and not self.is_identity and y.dtype in _SATURATE:
            y = y.nan_to_num_(nan=float("nan"), posinf=_SATURATE[y.dtype],
                              neginf=-_SATURATE[y.dtype])
        return y

    def roundtrip(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """dequantize(quantize(x)): what attention sees."""
        return self.dequantize(self.quantize(x, backend), backend)


_SATURATE = {dt: torch.finfo(dt).max for dt in (torch.float16, torch.bfloat16)}


@lru_cache(maxsize=1024)
def _steps_spec(steps: tuple[Step, ...]) -> str:
    return ">".join(s.to_spec() for s in steps)


def parse_cached(spec: str) -> Pipeline:
    """:meth:`Pipeline.parse` of a spec string, memoized (pipelines are immutable): a file with
    200k layer overrides repeating a few specs parses each spec once. A spec naming a file
    (``nuq(3,source=FILE#NAME)``) is parsed afresh: the file is resolved against the YAML that
    names it and read when the step is built."""
    if "source=" in spec:
        return Pipeline.parse(spec)
    return _parse_memo(spec)


@lru_cache(maxsize=512)
def _parse_memo(spec: str) -> Pipeline:
    return Pipeline.parse(spec)


def _split_options(spec: str) -> tuple[str, dict[str, Any]]:
    """``"ptok>int4; check_finite=false"`` -> ("ptok>int4", {"check_finite": False})."""
    steps, sep, rest = spec.partition(";")
    if not sep:
        return spec, {}
    options: dict[str, Any] = {}
    for item in rest.split(";"):
        key, eq, value = (part.strip() for part in item.partition("="))
        if key != "check_finite" or value.lower() not in ("true", "false"):
            raise SpecError(f"unknown pipeline option {shorten(item.strip())}",
                            spec=spec, pos=len(steps) + 1,
                            suggestion="the only option is '; check_finite=false'")
        options[key] = value.lower() == "true"
    return steps, options


def _steps_from_spec(spec: str) -> list[Step]:
    from kvq.registry import PRESETS

    parsed = parse(spec)
    only = parsed[0] if len(parsed) == 1 else None
    if only is not None and not only.args and not only.kwargs and only.name in PRESETS:
        cfg = PRESETS.get(parsed[0].name)()
        if cfg.keys != cfg.values:
            raise SpecError(f"preset {shorten(spec)} has different key and value pipelines",
                            suggestion=f"use kvq.kv({shorten(spec)}) for a K/V configuration")
        return list(cfg.keys.steps)
    steps = []
    for i, p in enumerate(parsed):
        try:
            steps.append(make_step(p, i))
        except SpecError as err:
            raise err.at(spec, p.pos) from None
    try:
        check_structure(steps)
    except SpecError as err:
        raise err.at(spec, parsed[getattr(err, "step", 0)].pos) from None
    return steps


def unwrap(exc: ValidationError) -> KVQError:
    """Turn a pydantic ValidationError into the kvq error it wraps, or a one-line SpecError."""
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    inner = (err.get("ctx") or {}).get("error")
    where = shorten(".".join(str(p) for p in err["loc"]), 60).strip("'")
    if isinstance(inner, KVQError):
        if where and isinstance(inner, SpecError) and inner.spec is None:
            return SpecError(f"{where}: {inner.reason}", suggestion=inner.suggestion)
        return inner
    if err["type"] == "missing":
        return SpecError(f"missing key '{where}' in {exc.title}")
    if err["type"] == "extra_forbidden":
        model = exc.title
        return SpecError(f"unknown key {shorten(err['loc'][-1])} in {model} at '{where}'",
                         suggestion=_key_hint(str(err["loc"][-1])[:64], model))
    return SpecError(f"{where or exc.title}: {err['msg'][:200]} "
                     f"(got {shorten(err.get('input'))})")


def _key_hint(key: str, model: str) -> str | None:
    import difflib

    from kvq.kvconfig import KVConfig, LayerOverride

    fields = {"Pipeline": Pipeline, "KVConfig": KVConfig, "LayerOverride": LayerOverride}.get(model)
    if fields is None:
        return None
    names = list(fields.model_fields) + (["kv"] if model != "Pipeline" else [])
    close = difflib.get_close_matches(key, names, n=1)
    return f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(names)
