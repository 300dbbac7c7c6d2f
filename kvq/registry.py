"""One registry class for every kind of component: steps, backends, presets.

Entries are lazy: a target is either an object or a ``"module:attr"`` string imported on first
use (so e.g. Triton is imported only when its backend is asked for). Names collide loudly and
unknown names get a "did you mean" suggestion.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any

from kvq.errors import KVQError, SpecError, shorten


@dataclass
class Entry:
    """One registered component: ``target`` (object or "module:attr") and default keyword args."""

    name: str
    target: Any
    defaults: dict[str, Any] = field(default_factory=dict)
    source: str = "kvq"

    def load(self) -> Any:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self.target = obj
        return self.target


class Registry:
    """Named components of one kind (``"step"``, ``"backend"``, ``"preset"``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, target: Any, *, defaults: dict[str, Any] | None = None,
                 source: str = "kvq") -> None:
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise KVQError(f"invalid {self.kind} name {shorten(name)}: use letters, digits, '-' and '_'")
        if name in self._entries:
            old = self._entries[name].source
            raise KVQError(f"{self.kind} {name!r} from {source!r} collides with the one "
                           f"from {old!r}")
        self._entries[name] = Entry(name, target, dict(defaults or {}), source)

    def entry(self, name: str) -> Entry:
        _ensure_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise SpecError(f"unknown {self.kind} {shorten(name)}",
                            suggestion=self.suggest(name)) from None

    def get(self, name: str) -> Any:
        return self.entry(name).load()

    def suggest(self, name: str) -> str:
        close = difflib.get_close_matches(name[:64], self.names(), n=3, cutoff=0.5)
        if close:
            return "did you mean " + " or ".join(repr(c) for c in close) + "?"
        return f"known {self.kind}s: " + ", ".join(self.names())

    def names(self) -> list[str]:
        _ensure_plugins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        _ensure_plugins()
        return name in self._entries

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]


STEPS = Registry("step")
BACKENDS = Registry("backend")
PRESETS = Registry("preset")


def _ensure_plugins() -> None:
    from kvq.plugins import load_plugins

    load_plugins()
