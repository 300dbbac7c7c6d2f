"""Fixtures for the kvq.hf tests; the tiny models live in hf_models.py."""

from __future__ import annotations

import pytest
from hf_models import tiny_model

import kvq.hf.flash_decode as flash_decode


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def count_fast(monkeypatch):
    """Number of decode steps served by the torch fast path."""
    calls = []
    orig = flash_decode.decode_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)

    monkeypatch.setattr(flash_decode, "decode_attention", counted)
    return calls
