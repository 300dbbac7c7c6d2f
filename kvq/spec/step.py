"""Base class of every pipeline step: a frozen pydantic model that knows its spec spelling."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from kvq.errors import SpecError, shorten
from kvq.spec.grammar import ParsedStep, format_value


class Step(BaseModel):
    """A pipeline step. Subclasses declare ``type: Literal["name"]`` and their parameters.

    ``role`` is ``"transform"``, ``"granularity"`` or ``"quantizer"``; ``positional`` names the
    fields that may be given without ``key=`` in a spec string, in order.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: ClassVar[str] = "transform"
    positional: ClassVar[tuple[str, ...]] = ()

    def spec_name(self) -> str:
        """The name this step is written with in a spec string."""
        return self.type  # type: ignore[attr-defined]

    def check_model(self, num_layers: int, head_dim: int, kv_heads: int | None = None) -> None:
        """Raise :class:`SpecError` if the step cannot serve this model (e.g. fitted for another).
        Called by :meth:`kvq.KVConfig.check`; most steps accept any model."""

    def spec_fixed(self) -> dict[str, Any]:
        """Fields implied by :meth:`spec_name` (``int4`` implies ``bits=4``)."""
        return {}

    def to_spec(self) -> str:
        """Canonical spelling: only non-default arguments, positional ones first."""
        fixed = self.spec_fixed()
        changed = {k: v for k, v in self.model_dump(exclude={"type"}).items()
                   if k not in fixed and v != type(self).model_fields[k].default}
        parts, positional = [], True
        for name in self.positional:
            if name in fixed:
                continue
            if name in changed and positional:
                parts.append(format_value(changed.pop(name)))
            else:
                positional = False
        parts += [f"{k}={format_value(v)}" for k, v in changed.items()]
        return self.spec_name() + (f"({','.join(parts)})" if parts else "")

    @classmethod
    def from_parsed(cls, parsed: ParsedStep, defaults: dict[str, Any]) -> Step:
        """Build from a parsed spec step (positional args mapped through ``positional``)."""
        names = [n for n in cls.positional if n not in defaults]
        if len(parsed.args) > len(names):
            raise SpecError(f"{shorten(parsed.name)} takes at most {len(names)} positional "
                            f"argument(s), got {len(parsed.args)}",
                            suggestion=_usage(cls, parsed.name))
        data = dict(defaults)
        for name, value in zip(names, parsed.args):
            data[name] = value
        for key, value in parsed.kwargs.items():
            if key in defaults:
                raise SpecError(f"{shorten(key)} is fixed by the name {shorten(parsed.name)}")
            if key in data:
                raise SpecError(f"{shorten(key)} given both by position and by name")
            data[key] = value
        return cls.validated(data, parsed.name)

    @classmethod
    def validated(cls, data: dict[str, Any], name: str) -> Step:
        """``model_validate`` with pydantic's errors turned into one-line :class:`SpecError`.

        Integers beyond 64 bits are refused here for every step (torch cannot take them).
        """
        for key, value in data.items():
            if isinstance(value, int) and not -2**63 <= value < 2**63:
                raise SpecError(f"argument {shorten(key)}={shorten(value)} of {shorten(name)} "
                                "does not fit in 64 bits", suggestion=_usage(cls, name))
        try:
            return cls.model_validate({"type": cls.model_fields["type"].default, **data})
        except ValidationError as exc:
            err = exc.errors()[0]
            field = shorten(".".join(str(p) for p in err["loc"]) or name, 40).strip("'")
            raise SpecError(f"bad argument {field}={shorten(err.get('input'))} for "
                            f"{shorten(name)}: {err['msg'][:200]}",
                            suggestion=_usage(cls, name)) from None


def _usage(cls: type[Step], name: str) -> str:
    from kvq.registry import STEPS

    fixed = STEPS.entry(name).defaults if name in STEPS else {}
    fields = [f for f in cls.model_fields if f != "type" and f not in fixed]
    if not fields:
        return f"{name!r} takes no arguments"
    shown = [f if cls.model_fields[f].is_required() else f"{f}={cls.model_fields[f].default!r}"
             for f in fields]
    return f"usage: {name}({', '.join(shown)})"
