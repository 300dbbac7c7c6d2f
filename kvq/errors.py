"""Errors raised by kvq. Every message names the problem, where it is, and what to do instead."""

from __future__ import annotations


class KVQError(ValueError):
    """Base class of every error kvq raises on bad input."""


class SpecError(KVQError):
    """A pipeline spec, YAML/JSON file or preset name is invalid.

    ``str(err)`` is one line; ``err.detail`` adds the spec with a caret under the position.
    """

    def __init__(self, message: str, *, spec: str | None = None, pos: int | None = None,
                 suggestion: str | None = None):
        self.reason, self.spec, self.pos, self.suggestion = message, spec, pos, suggestion
        where = f" at char {pos} of {spec!r}" if spec is not None and pos is not None else ""
        hint = f"; {suggestion}" if suggestion else ""
        super().__init__(f"{message}{where}{hint}")

    @property
    def detail(self) -> str:
        if self.spec is None or self.pos is None:
            return str(self)
        return f"{self}\n  {self.spec}\n  {' ' * self.pos}^"

    def at(self, spec: str, pos: int) -> SpecError:
        """The same error, located in ``spec`` (used when a step error surfaces during parsing)."""
        return SpecError(self.reason, spec=spec, pos=pos, suggestion=self.suggestion)


class BackendError(KVQError):
    """An explicitly requested backend cannot run this pipeline or input (says why)."""


class NumericsError(KVQError):
    """Input or metadata that cannot be represented: NaN/Inf input, fp16 overflow of norms, ..."""
