"""Plugin loading: the built-ins first, then every ``kvq`` entry point.

Set ``KVQ_DISABLE_PLUGINS=1`` to load only the built-ins (third-party plugins off, e.g. in tests
that must not depend on what else is installed).
"""

from __future__ import annotations

import os
import threading

import pluggy

from kvq import hookspecs

_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None


def plugin_manager() -> pluggy.PluginManager:
    """The loaded plugin manager (built-ins + entry points), created on first use."""
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
        from kvq.registry import BACKENDS, PRESETS, STEPS

        pm = pluggy.PluginManager("kvq")
        pm.add_hookspecs(hookspecs)
        pm.register(builtins, name="builtins")
        if os.environ.get("KVQ_DISABLE_PLUGINS", "") not in ("1", "true", "yes"):
            pm.load_setuptools_entrypoints("kvq")
        _pm = pm  # set before the hooks run: registering calls back into the registry
        for name, plugin in pm.list_name_plugin():
            source = "kvq" if plugin is builtins else name
            hooks = ((pm.hook.kvq_register_steps, STEPS), (pm.hook.kvq_register_backends, BACKENDS),
                     (pm.hook.kvq_register_presets, PRESETS))
            for hook, registry in hooks:
                impl = getattr(plugin, hook.name, None)
                if impl is not None:
                    impl(register=_registrar(registry, source))


def _registrar(registry, source):
    def register(name, target, defaults=None):
        registry.register(name, target, defaults=defaults, source=source)

    return register


def plugin_names() -> list[str]:
    """Names of the loaded plugins (``builtins`` first)."""
    return [name for name, _ in plugin_manager().list_name_plugin()]
