"""Plugin loading: the built-ins first, then every ``kvq`` entry point, each one isolated.

A third-party plugin that fails (at import, in a hook, with a hook signature pluggy rejects,
or with a registration kvq refuses: bad name or defaults, a collision (steps and presets
share one namespace), a step whose ``type`` is not its name) is recorded as broken with the
reason (``kvq list plugins``), warned about once, and contributes nothing: its registrations
are staged and committed all together or not at all. The built-ins and the other plugins
load regardless.

``KVQ_DISABLE_PLUGINS=1`` (or ``true``/``yes``/``all``) loads only the built-ins (third-party
plugins off, e.g. in tests); ``KVQ_DISABLE_PLUGINS=a,b`` skips the plugins named ``a`` and ``b``.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass

import pluggy

from kvq import hookspecs
from kvq.errors import KVQError, shorten

_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_status: dict[str, PluginStatus] = {}
HOOKS = ("kvq_register_steps", "kvq_register_backends", "kvq_register_presets")


class KVQPluginWarning(UserWarning):
    """A plugin was skipped because it is broken (the message names it and says why)."""


@dataclass
class PluginStatus:
    """What became of one plugin: ``state`` is ``ok``, ``broken`` or ``disabled``."""

    name: str
    state: str
    reason: str = ""
    components: int = 0


def plugin_manager() -> pluggy.PluginManager:
    """The loaded plugin manager (built-ins + working entry points), created on first use."""
    load_plugins()
    assert _pm is not None
    return _pm


def load_plugins() -> None:
    global _pm
    if _pm is not None:
        return
    with _lock:
        if _pm is not None:
            return
        from kvq import builtins

        pm = pluggy.PluginManager("kvq")
        pm.add_hookspecs(hookspecs)
        pm.register(builtins, name="builtins")
        _pm = pm  # set before the hooks run: a hook may ask the registry for names
        try:
            _register_components("builtins", builtins)
        except BaseException:
            _pm = None
            _clear_source("kvq")
            raise
        _status["builtins"] = PluginStatus("builtins", "ok", components=_count("kvq"))
        disabled = os.environ.get("KVQ_DISABLE_PLUGINS", "").strip()
        if disabled.lower() in ("1", "true", "yes", "all"):
            return
        skip = {n.strip() for n in disabled.split(",") if n.strip()}
        for ep in _entry_points():
            if ep.name == "builtins" or ep.name in _status:
                continue
            if ep.name in skip:
                _status[ep.name] = PluginStatus(ep.name, "disabled", "KVQ_DISABLE_PLUGINS")
                continue
            _load_one(pm, ep)


def _entry_points():
    from importlib.metadata import entry_points

    return sorted(entry_points(group="kvq"), key=lambda ep: ep.name)


def _load_one(pm: pluggy.PluginManager, ep) -> None:
    """Import, register and run the hooks of one plugin; on any failure, record it as broken."""
    stage = "import"
    try:
        plugin = ep.load()
        stage = "hook check"
        pm.register(plugin, name=ep.name)
        stage = "registration"
        _register_components(ep.name, plugin)
    except Exception as exc:  # noqa: BLE001 - a plugin may fail in any way; isolate it
        if pm.has_plugin(ep.name):
            pm.unregister(name=ep.name)
        mark_broken(ep.name, f"{stage} failed: {type(exc).__name__}: {str(exc)[:200]}")
        return
    _status[ep.name] = PluginStatus(ep.name, "ok", components=_count(ep.name))


def _register_components(name: str, plugin) -> None:
    """Call the plugin's hooks with staging registrars, check everything, then commit."""
    from kvq.registry import BACKENDS, PRESETS, STEPS

    source = "kvq" if name == "builtins" else name
    staged = []
    for hook, registry in zip(HOOKS, (STEPS, BACKENDS, PRESETS)):
        impl = getattr(plugin, hook, None)
        if impl is None:
            continue
        if not callable(impl):
            raise KVQError(f"{hook} is not a function")

        def register(n, target, defaults=None, registry=registry):
            staged.append((registry, n, target, defaults))

        impl(register=register)
    seen: dict[tuple[str, str], str] = {}
    for registry, n, target, defaults in staged:
        registry.check_new(n, target, defaults, source)
        space = "step/preset" if registry in (STEPS, PRESETS) and source != "kvq" else registry.kind
        if (space, n) in seen:
            raise KVQError(f"{registry.kind} {shorten(n)} registered twice (also as a "
                           f"{seen[space, n]}; steps and presets share one namespace)")
        seen[space, n] = registry.kind
    for registry, n, target, defaults in staged:
        registry.register(n, target, defaults=defaults, source=source)
    if source != "kvq":  # a plugin's presets must build (with its own steps, now committed)
        from kvq.kvconfig import KVConfig

        for registry, n, _, _ in staged:
            if registry is PRESETS and not isinstance(PRESETS.get(n)(), KVConfig):
                raise KVQError(f"preset {n!r} does not make a KVConfig")


def mark_broken(name: str, reason: str) -> None:
    """Record plugin ``name`` as broken, drop what it registered, and warn once."""
    _clear_source(name)
    _status[name] = PluginStatus(name, "broken", reason)
    warnings.warn(f"kvq: plugin {name!r} skipped: {reason}", KVQPluginWarning, stacklevel=3)


def _clear_source(source: str) -> None:
    from kvq.registry import BACKENDS, PRESETS, STEPS

    for registry in (STEPS, BACKENDS, PRESETS):
        registry.drop_source(source)


def _count(source: str) -> int:
    from kvq.registry import BACKENDS, PRESETS, STEPS

    return sum(r.count_source(source) for r in (STEPS, BACKENDS, PRESETS))


def plugin_names() -> list[str]:
    """Names of the plugins that loaded (``builtins`` first)."""
    return [name for name, _ in plugin_manager().list_name_plugin()]


def plugin_status() -> list[PluginStatus]:
    """Every plugin kvq found: loaded, broken (with the reason) or disabled."""
    load_plugins()
    return list(_status.values())
