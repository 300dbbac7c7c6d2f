"""Fixtures of the peer-parity tests (helpers: oracles.py)."""

import pytest
from oracles import peer


@pytest.fixture(scope="session")
def vllm_centroids():
    return peer("vllm_turboquant_centroids")


@pytest.fixture(scope="session")
def vllm_config():
    return peer("vllm_turboquant_config")
