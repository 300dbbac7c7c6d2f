"""Offline fitting: weighted 1-D k-means, recipes, normalized samples."""

import pytest
import torch

from kvq.calibration import LevelFit, recipe_bits, weighted_kmeans_1d, with_source
from kvq.errors import SpecError
from kvq.testing import kv_like


def test_kmeans_reaches_the_lloyd_max_levels_of_a_gaussian():
    v = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    lv = weighted_kmeans_1d(v, torch.ones_like(v), 4)
    # Max (1960), 4-level quantizer of N(0, 1): +-0.4528, +-1.510
    assert torch.allclose(lv, torch.tensor([-1.510, -0.4528, 0.4528, 1.510]), atol=0.02)
    assert (lv[1:] > lv[:-1]).all()


def test_weights_pull_the_levels():
    v = torch.linspace(-1, 1, 10_001)
    w = torch.where(v > 0, 100.0, 1.0)
    lv = weighted_kmeans_1d(v, w, 4)
    plain = weighted_kmeans_1d(v, torch.ones_like(v), 4)
    assert (lv > 0).sum() > (plain > 0).sum()


def test_pinned_ends():
    v = torch.rand(50_000, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lv = weighted_kmeans_1d(v, torch.ones_like(v), 4, ends=(-1.0, 1.0))
    assert lv[0] == -1 and lv[-1] == 1
    assert torch.allclose(lv[1:3], torch.tensor([-1 / 3, 1 / 3]), atol=0.02)  # uniform data


def test_degenerate_data_gives_distinct_levels():
    v = torch.zeros(100)
    lv = weighted_kmeans_1d(v, torch.ones_like(v), 8)
    assert lv.shape == (8,) and (lv[1:] > lv[:-1]).all()


def test_recipes():
    assert recipe_bits("sparse(0.01,channel)>pchan>nuq(3)") == 3
    assert recipe_bits("sparse(0.01,channel)>nuq(2,scale=static)") == 2
    assert with_source("ptok>nuq(2,scale=static)", "f.safetensors#L1.k") == \
        "ptok>nuq(2,scale=static,source=f.safetensors#L1.k)"
    for bad in ("ptok>int3", "nuq(3)>ptok>int3", "ptok>nuq(3,source=a#b)"):
        with pytest.raises(SpecError):
            recipe_bits(bad)


def test_samples_are_the_quantizer_inputs_in_minus_one_one():
    fit = LevelFit("sparse(0.02)>ptok>nuq(3)")
    fit.add(kv_like(1, 2, 64, 64), block=32)
    v = torch.cat(fit.values)
    assert v.abs().max() <= 1 + 1e-3 and v.numel() == 2 * 64 * 64
    assert fit.fit().shape == (8,)


def test_static_fit_scales_per_head_and_channel():
    x = kv_like(1, 3, 256, 64, seed=4)
    fit = LevelFit("nuq(3,scale=static)")
    fit.add(x, block=32)
    fit.fit()
    assert fit.zero.shape == fit.scale.shape == (3, 64)
    span = x.amax(dim=2)[0] - x.amin(dim=2)[0]
    assert (2 * fit.scale <= span + 1e-4).all() and (2 * fit.scale > 0.5 * span).all()
