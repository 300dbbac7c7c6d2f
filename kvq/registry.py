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


def check_step(name: str, target: Any, defaults: dict[str, Any]) -> None:
    """Raise :class:`KVQError` unless ``target`` is a Step class that ``name`` can build and
    whose ``to_spec()`` writes ``name`` back (its ``type`` is ``name``, or, with defaults, the
    step built from them is spelled ``name``); defaults must be valid field values."""
    from pydantic import ValidationError

    from kvq.spec.step import Step

    if not (isinstance(target, type) and issubclass(target, Step)):
        raise KVQError(f"step {shorten(name)} is not a kvq.Step subclass: {shorten(target)}")
    field = target.model_fields.get("type")
    kind = field.default if field is not None else None
    if not isinstance(kind, str):
        raise KVQError(f"step class {target.__name__} has no 'type' literal")
    unknown = sorted(set(defaults) - set(target.model_fields))
    if unknown:
        raise KVQError(f"defaults {unknown} of step {shorten(name)} are not fields of "
                       f"{target.__name__}")
    if not defaults:
        if kind != name:
            raise KVQError(f"step {shorten(name)} is a {target.__name__} whose type is "
                           f"{kind!r}, so its to_spec() would not build; register it as "
                           f"{kind!r}")
        return
    try:
        step = target.model_validate({"type": kind, **defaults})
    except ValidationError as exc:
        bad = [e for e in exc.errors() if e["type"] != "missing"]
        if bad:
            raise KVQError(f"bad default {'.'.join(map(str, bad[0]['loc']))}="
                           f"{shorten(bad[0].get('input'))} for step {shorten(name)}: "
                           f"{bad[0]['msg'][:200]}") from None
        return
    if step.spec_name() != name:
        raise KVQError(f"step {shorten(name)} with defaults {defaults} is written "
                       f"{step.spec_name()!r} by to_spec(), so that would not build; "
                       f"register it as {step.spec_name()!r}")


class Registry:
    """Named components of one kind (``"step"``, ``"backend"``, ``"preset"``)."""

    def __init__(self, kind: str, check=None):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._check = check  # (name, loaded target, defaults) -> None or raise KVQError
        self.shares_names_with: Registry | None = None  # steps and presets: one namespace

    def check_new(self, name: Any, target: Any, defaults: Any = None,
                  source: str = "kvq") -> None:
        """Raise :class:`KVQError` if ``register(name, target, defaults=defaults)`` would be
        refused, or, for an already-imported target, if it does not fit this registry."""
        if not isinstance(name, str) or not name.isascii() or not (
                name[:1].isalpha() and name.replace("-", "").replace("_", "").isalnum()):
            raise KVQError(f"invalid {self.kind} name {shorten(name)}: use letters, digits, "
                           "'-' and '_', starting with a letter")
        if name in self._entries:
            old = self._entries[name].source
            raise KVQError(f"{self.kind} {name!r} from {source!r} collides with the one "
                           f"from {old!r}")
        peer = self.shares_names_with
        if peer is not None and source != "kvq" and name in peer._entries:
            raise KVQError(f"{self.kind} {name!r} from {source!r} collides with the "
                           f"{peer.kind} {name!r} from {peer._entries[name].source!r}: steps "
                           "and presets share one namespace (a spec or YAML naming it would "
                           "mean either); rename it")
        if defaults is not None and not (isinstance(defaults, dict)
                                         and all(isinstance(k, str) for k in defaults)):
            raise KVQError(f"defaults of {self.kind} {name!r} must be a dict of field values, "
                           f"got {shorten(defaults)}")
        if self._check is not None and not isinstance(target, str):
            self._check(name, target, dict(defaults or {}))

    def register(self, name: str, target: Any, *, defaults: dict[str, Any] | None = None,
                 source: str = "kvq") -> None:
        self.check_new(name, target, defaults, source)
        self._entries[name] = Entry(name, target, dict(defaults or {}), source)

    def drop_source(self, source: str) -> None:
        """Forget every entry registered by ``source`` (a plugin found broken)."""
        self._entries = {n: e for n, e in self._entries.items() if e.source != source}

    def count_source(self, source: str) -> int:
        return sum(e.source == source for e in self._entries.values())

    def entry(self, name: str) -> Entry:
        _ensure_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise SpecError(f"unknown {self.kind} {shorten(name)}",
                            suggestion=self.suggest(name)) from None

    def get(self, name: str) -> Any:
        return self.load(self.entry(name))

    def load(self, entry: Entry) -> Any:
        """``entry.load()``; a plugin's entry that fails to import or to check marks its plugin
        broken (all its entries dropped) and raises :class:`KVQError`."""
        lazy = isinstance(entry.target, str)
        try:
            obj = entry.load()
            if lazy and self._check is not None:
                self._check(entry.name, obj, entry.defaults)
            return obj
        except Exception as exc:
            if entry.source == "kvq":
                raise
            from kvq.plugins import mark_broken

            reason = f"{self.kind} {entry.name!r}: {type(exc).__name__}: {str(exc)[:200]}"
            mark_broken(entry.source, reason)
            raise KVQError(f"plugin {entry.source!r} is broken ({reason})") from None

    def loaded(self) -> list[tuple[Entry, Any]]:
        """(entry, object) for every entry that loads; broken plugins' entries are left out."""
        out = []
        for entry in self.entries():
            try:
                out.append((entry, self.load(entry)))
            except KVQError:
                if entry.source == "kvq":
                    raise
        return [(e, obj) for e, obj in out if self._entries.get(e.name) is e]

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


STEPS = Registry("step", check=check_step)
BACKENDS = Registry("backend")
PRESETS = Registry("preset")
STEPS.shares_names_with, PRESETS.shares_names_with = PRESETS, STEPS
# (the built-in presets q4_0, q4_1, q8_0, fp8 are that step for keys and values, on purpose)


def _ensure_plugins() -> None:
    from kvq.plugins import load_plugins

    load_plugins()
