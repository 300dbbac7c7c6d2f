"""Make ``lm_eval --model kvq_hf`` work as typed: register kvq's model with lm-eval lazily.

lm-eval 0.4.13 has no plugin discovery for models: its registry is filled by importing
``lm_eval.models`` (a fixed table), and registering anything *before* that import stops the
built-in models from loading. So this module, run at interpreter start-up by the one-line
``kvq-lm-eval.pth`` file installed into site-packages, only adds an import hook (standard
library only; it imports neither kvq nor lm_eval nor torch): when ``lm_eval.models`` finishes
importing, it registers ``kvq_hf`` as the lazy target ``kvq.eval.lm_eval_model:KVQLM``.
Nothing is imported or patched in processes that never import lm-eval.

The .pth line (:data:`PTH_LINE`, running :data:`BOOT`) finds this file through
``importlib.util.find_spec("kvq")`` (which does not import kvq) and runs it; any failure is
silent, so a broken install can never break Python start-up. ``KVQ_NO_LM_EVAL_HOOK=1``
turns it off.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

MODEL_NAME = "kvq_hf"
TARGET = "kvq.eval.lm_eval_model:KVQLM"
WATCHED = "lm_eval.models"
#: What the .pth line runs at start-up: locate this file without importing kvq, run it, install().
BOOT = """\
try:
    import importlib.util as u, os
    s = u.find_spec("kvq")
    if s and s.submodule_search_locations and not os.environ.get("KVQ_NO_LM_EVAL_HOOK"):
        p = os.path.join(list(s.submodule_search_locations)[0], "eval", "lm_eval_hook.py")
        if os.path.exists(p):
            m = u.module_from_spec(u.spec_from_file_location("_kvq_lm_eval_hook", p))
            m.__spec__.loader.exec_module(m)
            m.install()
except Exception:
    pass
"""
#: The whole content of ``kvq-lm-eval.pth`` (site runs .pth lines that start with ``import``).
PTH_LINE = f"import sys; exec({BOOT!r})\n"


def register() -> None:
    """Register ``kvq_hf`` in lm-eval's model registry (call after ``lm_eval.models`` loaded)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``lm_eval.models`` so that :func:`register` runs right after it."""

    kvq_hook = True

    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # get_filename, get_resource_reader, ... of the real loader
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        uninstall()
        try:
            register()
        except Exception as err:  # noqa: BLE001 - never break lm-eval's own models
            print(
                f"kvq: could not register the {MODEL_NAME!r} lm-eval model: {err}", file=sys.stderr
            )


def install() -> None:
    """Register now if lm-eval's models are already imported, else when they are."""
    if os.environ.get("KVQ_NO_LM_EVAL_HOOK"):
        return
    if WATCHED in sys.modules:
        register()
    elif not any(getattr(f, "kvq_hook", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "kvq_hook", False)]
