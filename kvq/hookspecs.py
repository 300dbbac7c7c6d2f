"""Every kvq plugin hook. Built-in components register through these hooks too.

A plugin is a module exposed under the ``kvq`` entry-point group, e.g. in its pyproject.toml::

    [project.entry-points.kvq]
    center = "kvq_center.plugin"

and implements any of the hooks below with ``@kvq.hookimpl``.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("kvq")
hookimpl = pluggy.HookimplMarker("kvq")


@hookspec
def kvq_register_steps(register):
    """Register pipeline steps (transforms, granularities, quantizers).

    Call ``register(name, target, defaults=None)``: ``target`` is a :class:`kvq.Step` subclass
    or a lazy ``"module:attr"`` string; ``defaults`` are fixed keyword args (``int4`` is the
    ``int`` quantizer with ``bits=4``).
    """


@hookspec
def kvq_register_backends(register):
    """Register backends: ``register(name, target)`` with a :class:`kvq.backends.Backend` class."""


@hookspec
def kvq_register_presets(register):
    """Register named K/V configurations: ``register(name, factory)``, factory() -> KVConfig."""
