"""Errors raised by kvq. Every message names the problem, where it is, and what to do instead."""

from __future__ import annotations

from typing import Any

#: the most characters of user input any error message shows
SHOW_MAX = 80


def shorten(value: Any, limit: int = SHOW_MAX) -> str:
    """``repr(value)`` cut to ``limit`` characters (``...`` and the full length marked).

    Every error path that shows user input uses this, so a hostile 100k-character spec or an
    alias-bomb document gives a one-line message. Containers are summarised without building
    their full repr (an alias bomb expands to billions of elements).
    """
    if isinstance(value, (list, tuple, dict, set)):
        return f"<{type(value).__name__} of {len(value)} item(s)>"
    text = value if isinstance(value, str) else None
    if text is not None and len(text) > limit:
        return repr(text[:limit]) + f"... ({len(text)} chars)"
    shown = repr(value)
    return shown if len(shown) <= limit else shown[:limit] + f"... ({len(shown)} chars)"


def excerpt(spec: str, pos: int, limit: int = SHOW_MAX) -> tuple[str, int]:
    """The part of ``spec`` around ``pos`` (at most ``limit`` chars) and ``pos`` within it."""
    if len(spec) <= limit:
        return spec, pos
    start = max(0, min(pos - limit // 2, len(spec) - limit))
    head, tail = ("..." if start else ""), ("..." if start + limit < len(spec) else "")
    return head + spec[start:start + limit] + tail, pos - start + len(head)


class KVQError(ValueError):
    """Base class of every error kvq raises on bad input."""


class SpecError(KVQError):
    """A pipeline spec, YAML/JSON file or preset name is invalid.

    ``str(err)`` is one line; ``err.detail`` adds the spec with a caret under the position.
    """

    def __init__(self, message: str, *, spec: str | None = None, pos: int | None = None,
                 suggestion: str | None = None):
        self.reason, self.spec, self.pos, self.suggestion = message, spec, pos, suggestion
        where = ""
        if spec is not None and pos is not None:
            where = f" at char {pos} of {excerpt(spec, pos)[0]!r}"
            if len(spec) > SHOW_MAX:
                where += f" ({len(spec)} chars)"
        hint = f"; {suggestion}" if suggestion else ""
        super().__init__(f"{message}{where}{hint}")

    @property
    def detail(self) -> str:
        if self.spec is None or self.pos is None:
            return str(self)
        shown, pos = excerpt(self.spec, self.pos)
        return f"{self}\n  {shown}\n  {' ' * pos}^"

    def at(self, spec: str, pos: int) -> SpecError:
        """The same error, located in ``spec`` (used when a step error surfaces during parsing)."""
        return SpecError(self.reason, spec=spec, pos=pos, suggestion=self.suggestion)


class BackendError(KVQError):
    """An explicitly requested backend cannot run this pipeline or input (says why)."""


class NumericsError(KVQError):
    """Input or metadata that cannot be represented: NaN/Inf input, fp16 overflow of norms, ..."""
