"""Backends run pipelines: a readable torch reference (the oracle) and Triton kernels."""

from kvq.backends.base import Backend
from kvq.backends.select import BACKEND_CHOICES, get_backend, resolve_backend

__all__ = ["BACKEND_CHOICES", "Backend", "get_backend", "resolve_backend"]
