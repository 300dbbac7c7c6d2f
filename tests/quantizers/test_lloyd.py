"""lloyd: Lloyd-Max conditions, Max's (1960) Gaussian tables, bits (vLLM's own codebook,
``dist=vllm``, is tested against vLLM's centroids.py in tests/parity/test_turboquant.py)."""

import math

import numpy as np
import pytest
import torch

import kvq
from kvq.quantizers.lloyd import lloyd_max
from kvq.testing import check_step, kv_like, sqnr_db

# Max (1960), "Quantizing for minimum distortion", Table I: positive levels for N(0, 1)
MAX_1960 = {2: [0.4528, 1.510], 3: [0.2451, 0.7560, 1.344, 2.152],
            4: [0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733]}


def pdf(dist, d):
    if dist == "gaussian":
        return lambda x: np.exp(-0.5 * d * x * x), 12 / math.sqrt(d)
    return lambda x: np.clip(1 - x * x, 0, None) ** ((d - 3) / 2), 1.0


def cell_moments(f, a, b, nodes=64):
    """(mass, first moment) of f on [a, b] by Gauss-Legendre (independent of lloyd's grid)."""
    t, w = np.polynomial.legendre.leggauss(nodes)
    x = (b - a) / 2 * t + (a + b) / 2
    fx = f(x) * w * (b - a) / 2
    return fx.sum(), (fx * x).sum()


@pytest.mark.parametrize("dist", ["beta", "gaussian"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d", [64, 256])
def test_centroid_and_midpoint_conditions(dist, bits, d):
    lv = lloyd_max(bits, d, dist).double().numpy()
    f, span = pdf(dist, d)
    bounds = np.concatenate([[-span], (lv[1:] + lv[:-1]) / 2, [span]])  # midpoint condition
    for i in range(len(lv)):
        # the tail cells are integrated piecewise (the density falls fast there)
        pieces = np.linspace(bounds[i], bounds[i + 1], 9)
        mass, moment = map(sum, zip(*[cell_moments(f, a, b) for a, b in zip(pieces, pieces[1:])]))
        assert lv[i] == pytest.approx(moment / mass, abs=2e-5 / math.sqrt(d))  # centroid
    assert np.allclose(lv, -lv[::-1], atol=1e-7) and np.all(np.diff(lv) > 0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gaussian_matches_max_1960(bits):
    for d in (64, 128):
        lv = lloyd_max(bits, d, "gaussian") * math.sqrt(d)
        half = lv[2 ** (bits - 1):].tolist()
        assert half == pytest.approx(MAX_1960[bits], abs=1.5e-3)


def test_beta_is_the_better_codebook_for_real_unit_vectors():
    """At d=64 the exact density beats its Gaussian limit on coordinates of random unit vectors
    (and the two differ by a few percent at the outer levels)."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 1, 20000, 64, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    err = {dist: (kvq.build(f"lloyd3(none,{dist})").roundtrip(u) - u).pow(2).mean().item()
           for dist in ("beta", "gaussian")}
    assert err["beta"] < err["gaussian"]
    b, gs = lloyd_max(3, 64, "beta"), lloyd_max(3, 64, "gaussian")
    assert 0.005 < 1 - b[-1] / gs[-1] < 0.05


def test_turboquant_pipeline_bits_and_quality():
    p = kvq.build("nsep>rot>lloyd4(none)")
    assert p.to_spec() == "nsep>rot>lloyd4(none)"
    assert p.bits_per_element(head_dim=64, seq=32) == 4 + 16 / 64  # codes + fp16 norm only
    x = kv_like(1, 2, 64, 128)
    q = p.quantize(x)
    assert set(q.meta) == {"norm"}
    # TurboQuant's MSE at 4 bits is ~0.009 of ||x||^2 (Zandieh et al., Thm 1): ~20 dB
    assert sqnr_db(x, p.dequantize(q)) > 19
    assert sqnr_db(x, kvq.build("nsep>rot>lloyd3(none)").roundtrip(x)) > 13


def test_spec_forms_and_errors():
    assert kvq.build("lloyd(3,dist=gaussian)").to_spec() == "lloyd3(dist=gaussian)"
    assert kvq.build("lloyd2(none, gaussian)").quantizer.dist == "gaussian"
    with pytest.raises(kvq.SpecError, match="lloyd"):
        kvq.build("lloyd(8)")
    with pytest.raises(kvq.SpecError):
        kvq.build("lloyd4(scale=max)")


def test_conformance():
    check_step("lloyd4", min_sqnr=8)  # Gaussian-shaped levels on outlier channels
    check_step("lloyd4", transforms="rot", min_sqnr=19)
    check_step("lloyd3(none)", transforms="nsep>rot", min_sqnr=14)
