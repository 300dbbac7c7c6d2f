"""Grammar of spec strings.

::

    spec  := step (">" step)*
    step  := NAME ["(" [arg ("," arg)*] ")"]
    arg   := VALUE | KEY "=" VALUE
    NAME  := [A-Za-z][A-Za-z0-9_-]*      e.g. nsep, pchan, int4, group
    VALUE := int | float | true/false | bare word (sym, asym, token, fp16, ...)

Whitespace around tokens is ignored. Examples: ``nsep>pchan>int4``,
``group(32,token)>int4(asym)``, ``nsep(renorm=false)>pchan>int3``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kvq.errors import SpecError, shorten

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_ARG = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)\s*=\s*)?([^,()=>\s]+)\s*")


@dataclass
class ParsedStep:
    """One step of a spec string, with the character offset where it starts."""

    name: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    pos: int = 0


def parse(spec: str) -> list[ParsedStep]:
    """Split a spec string into steps; raises :class:`SpecError` with the offending position."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError("empty pipeline spec", suggestion="write e.g. 'nsep>pchan>int4'")
    steps, i = [], 0
    while True:
        i = _skip_ws(spec, i)
        m = _NAME.match(spec, i)
        if not m:
            what = "nothing" if i >= len(spec) else repr(spec[i])
            raise SpecError(f"expected a step name, found {what}", spec=spec, pos=i,
                            suggestion="steps are names like 'nsep' or 'int4' joined by '>'")
        step = ParsedStep(m.group(0), pos=i)
        i = _skip_ws(spec, m.end())
        if i < len(spec) and spec[i] == "(":
            i = _parse_args(spec, i + 1, step)
        steps.append(step)
        i = _skip_ws(spec, i)
        if i >= len(spec):
            return steps
        if spec[i] != ">":
            raise SpecError(f"unexpected {spec[i]!r} after step {shorten(step.name)}",
                            spec=spec, pos=i,
                            suggestion="join steps with '>' and put arguments in parentheses")
        i += 1


def _parse_args(spec: str, i: int, step: ParsedStep) -> int:
    if _skip_ws(spec, i) < len(spec) and spec[_skip_ws(spec, i)] == ")":
        return _skip_ws(spec, i) + 1
    while True:
        m = _ARG.match(spec, i)
        if not m:
            raise SpecError(f"malformed argument of {shorten(step.name)}", spec=spec, pos=i,
                            suggestion="arguments are values or key=value, separated by ','")
        key, value = m.group(1), _value(m.group(2))
        if key is None:
            if step.kwargs:
                raise SpecError("positional argument after key=value", spec=spec, pos=m.start(2))
            step.args.append(value)
        elif key in step.kwargs:
            raise SpecError(f"argument {shorten(key)} given twice", spec=spec, pos=m.start(1))
        else:
            step.kwargs[key] = value
        i = m.end()
        if i < len(spec) and spec[i] == ",":
            i += 1
        elif i < len(spec) and spec[i] == ")":
            return i + 1
        else:
            raise SpecError(f"unclosed argument list of {shorten(step.name)}", spec=spec, pos=i,
                            suggestion="close it with ')'")


def _skip_ws(spec: str, i: int) -> int:
    while i < len(spec) and spec[i].isspace():
        i += 1
    return i


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def format_value(value: Any) -> str:
    """The spec-string spelling of an argument value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
