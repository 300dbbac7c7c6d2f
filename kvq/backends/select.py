"""Backend selection: ``auto`` falls back quietly, an explicit choice raises the real reason."""

from __future__ import annotations

import torch

from kvq.errors import BackendError, KVQError

BACKEND_CHOICES = ("auto", "torch", "triton")
_instances: dict[str, object] = {}


def get_backend(name: str):
    """The backend instance registered as ``name`` (``torch``, ``triton``, or a plugin's)."""
    from kvq.registry import BACKENDS

    if name not in _instances:
        try:
            cls = BACKENDS.get(name)
        except ImportError as exc:
            raise BackendError(f"backend {name!r} cannot be imported: {exc}") from None
        _instances[name] = cls()
    return _instances[name]


def resolve_backend(name: str, pipeline, x: torch.Tensor):
    """The backend that will run ``pipeline`` on ``x``.

    ``auto``: Triton for CUDA tensors when it supports the pipeline, the torch reference
    otherwise. An explicit name raises :class:`BackendError` saying why it cannot run.
    """
    if name == "auto":
        if x.is_cuda:
            try:
                triton = get_backend("triton")
            except KVQError:
                triton = None
            if triton is not None and triton.supports(pipeline, x):
                return triton
        return get_backend("torch")
    backend = get_backend(name)
    reason = backend.why_unsupported(pipeline, x)
    if reason:
        raise BackendError(f"backend {name!r} cannot run {pipeline.to_spec()!r}: {reason}")
    return backend
