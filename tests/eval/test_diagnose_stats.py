"""Diagnose statistics and classification on synthetic tensors with known answers."""

from __future__ import annotations

import pytest
import torch

from kvq.errors import KVQError
from kvq.eval.diagnose.classify import classify
from kvq.eval.diagnose.stats import head_stats


def _base(heads=2, seq=257, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, heads, seq, dim, generator=g) * 2 - 1  # uniform(-1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_planted_outlier_channels(dtype):
    x = _base()
    x[..., :, 0] = 1.0  # every channel has absmax ~1 ...
    x[:, 1, 5, 7] = 40.0  # ... except channel 7 of head 1
    s = head_stats(x.to(dtype))
    assert s["outlier_ratio"][0] == pytest.approx(1.0, abs=0.02)
    assert s["outlier_ratio"][1] == pytest.approx(40.0, rel=0.03)


def test_planted_norm_variation():
    x = torch.nn.functional.normalize(_base(seq=100), dim=-1)
    x[:, 0, :50] *= 5.0  # head 0: half the tokens 5x longer
    s = head_stats(x)
    assert s["norm_max_min"][0] == pytest.approx(5.0, rel=1e-4)
    assert s["norm_max_min"][1] == pytest.approx(1.0, rel=1e-4)
    assert s["norm_cv"][0] == pytest.approx(4 / 6 * (100 / 99) ** 0.5, rel=1e-3)  # {1,5} halves
    assert s["norm_cv"][1] == pytest.approx(0.0, abs=1e-5)


def test_kurtosis_gaussian_and_heavy_tail():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 4096, 64, generator=g)
    x[:, 1] = torch.distributions.Laplace(0.0, 1.0).sample((4096, 64))
    k = head_stats(x)["kurtosis"]
    assert k[0] == pytest.approx(0.0, abs=0.1)
    assert k[1] == pytest.approx(3.0, abs=0.3)  # Laplace excess kurtosis is 3


def test_stats_reject_bad_input():
    with pytest.raises(KVQError, match="batch, kv_heads, seq, head_dim"):
        head_stats(torch.zeros(3, 4))
    with pytest.raises(KVQError, match="at least 2 tokens"):
        head_stats(torch.zeros(1, 1, 1, 8))


def test_zero_tensor_stays_finite():
    s = head_stats(torch.zeros(1, 1, 9, 16))
    assert all(torch.isfinite(torch.tensor(v)).all() for v in s.values())


def test_classify_planted_modes():
    flat = torch.nn.functional.normalize(_base(seq=300), dim=-1)
    outliers = flat.clone()
    outliers[:, 0, :, 3] = 30.0 * outliers[:, 0, :, 3].sign()  # steady, like a bias outlier
    varied = flat.clone()
    varied[:, :, ::2] *= 4.0
    both = varied.clone()
    both[:, 0, :, 3] = 30.0 * both[:, 0, :, 3].sign()
    modes = {name: classify(head_stats(k), head_stats(flat)) for name, k in
             (("flat", flat), ("outliers", outliers), ("varied", varied), ("both", both))}
    assert modes == {"flat": "benign", "outliers": "Mode 1", "varied": "Mode 2", "both": "both"}
    assert classify(head_stats(flat), head_stats(varied)) == "Mode 2"  # values count for Mode 2
