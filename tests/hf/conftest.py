"""Fixtures for the kvq.hf tests; the tiny models live in hf_models.py."""

from __future__ import annotations

import pytest
from hf_models import tiny_model


@pytest.fixture
def llama():
    return tiny_model("llama")
