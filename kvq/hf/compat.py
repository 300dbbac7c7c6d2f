"""Pass a cache under the argument name the installed transformers expects.

transformers 5.24 renamed ``past_key_values=`` to ``cache=`` in ``forward`` and ``generate``
(the old name warns, and goes in 5.40); 5.23 and earlier accept only ``past_key_values=``. The
name is read once per model class from ``forward``'s signature.

>>> out = model(ids, **cache_kwargs(model, cache), use_cache=True)   # doctest: +SKIP
>>> model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=8)  # doctest: +SKIP
"""

from __future__ import annotations

import inspect

_NAMES: dict[type, str] = {}


def cache_arg(model) -> str:
    """``"cache"`` when ``model.forward`` takes it, else ``"past_key_values"``."""
    kind = type(model)
    if kind not in _NAMES:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # no signature: keep the old name
            params = {}
        _NAMES[kind] = "cache" if "cache" in params else "past_key_values"
    return _NAMES[kind]


def cache_kwargs(model, cache) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, for ``model`` and ``generate``."""
    return {cache_arg(model): cache}
