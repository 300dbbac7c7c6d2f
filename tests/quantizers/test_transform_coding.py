"""klt + alloc (transform coding): allocation optimality, Lloyd-Max constants, exact bit stream,
nearest-level codes, KLT invertibility, fitted-file errors, and the gain over a fixed codebook."""

import itertools

import pytest
import torch

import kvq
from kvq import codebooks
from kvq.calibration import fold_blocks
from kvq.testing import DTYPES, HEAD_DIMS, sqnr_db
from kvq.transform_coding import (
    TransformFit,
    allocate,
    gaussian_lloyd_max,
    kmeans_rows,
    with_source,
)


def anisotropic(batch, heads, seq, d, seed=0, dtype=torch.float32):
    """K/V-like samples (``seed``) of one distribution per (heads, d): a per-head random basis
    with a decaying spectrum, a mean, and token norm variation."""
    mix = torch.randn(heads, d, d, generator=torch.Generator().manual_seed(d))
    mix = mix * torch.logspace(0, -2, d)[:, None]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, seq, d, generator=g) @ mix + 0.3
    x = x * (1 + torch.rand(batch, heads, seq, 1, generator=g) * 3)
    return x.to(dtype)


def fitted(tmp_path, bits, d=64, heads=2, name="L0.k", levels="gaussian", seed=0):
    fit = TransformFit(f"nsep>klt>alloc({bits})", levels=levels)
    fit.add(anisotropic(1, heads, max(600, 6 * d), d, seed=seed))
    path = tmp_path / f"tc{bits}_{d}.safetensors"
    codebooks.write(path, {f"{name}.{k}": v for k, v in fit.fit().items()},
                    {"num_layers": 1, "head_dim": d})
    return path


def test_lloyd_max_gaussian_mse_is_max_1960():
    # J. Max, "Quantizing for minimum distortion" (1960), Table: optimal MSE of N(0, 1)
    for bits, mse in [(1, 0.3634), (2, 0.1175), (3, 0.03454), (4, 0.009497)]:
        assert gaussian_lloyd_max(bits)[1] == pytest.approx(mse, rel=2e-3)


def test_greedy_allocation_is_optimal_against_brute_force():
    g = [gaussian_lloyd_max(w)[1] for w in range(9)]
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        var = torch.rand(1, 4, generator=gen).pow(4) * 10
        widths = allocate(var, 2)
        assert int(widths.sum()) == 8
        v = var[0].tolist()
        best = min(sum(v[c] * g[w[c]] for c in range(4))
                   for w in itertools.product(range(9), repeat=4) if sum(w) == 8)
        got = sum(v[c] * g[int(widths[0, c])] for c in range(4))
        assert got == pytest.approx(best, rel=1e-9)


def test_kmeans_rows_satisfy_centroid_and_midpoint_conditions():
    v = torch.randn(3, 5000, generator=torch.Generator().manual_seed(1)).double()
    lv = kmeans_rows(v, 8, iters=300).double()
    assert (lv[:, 1:] > lv[:, :-1]).all()
    cells = torch.searchsorted((lv[:, 1:] + lv[:, :-1]) / 2, v, right=True)
    for r in range(3):
        for j in range(8):
            assert lv[r, j] == pytest.approx(float(v[r][cells[r] == j].mean()), abs=1e-6)


def test_alloc_codes_nearest_level_and_exact_bit_stream(tmp_path):
    path = fitted(tmp_path, 3, levels="kmeans")
    ref = f"{path}#L0.k"
    p = kvq.build(f"alloc(3,source={ref})")
    tensors = codebooks.read(path)[1]
    widths, levels = tensors["L0.k.alloc.widths"].long(), tensors["L0.k.alloc.levels"]
    assert int(widths.max()) > 3 and int(widths.min()) == 0  # really unequal widths
    x = torch.randn(2, 2, 37, 64, generator=torch.Generator().manual_seed(2)) * 0.2
    q = p.quantize(x)
    assert q.nbytes == 2 * 2 * 37 * 64 * 3 // 8  # exactly 3 bits per element, no metadata
    y = p.dequantize(q)
    for h in range(2):
        for c in range(64):
            lv = levels[h, c, : 2 ** int(widths[h, c])]
            want = lv[(x[:, h, :, c, None] - lv).abs().argmin(-1)]
            assert torch.equal(y[:, h, :, c], want)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_every_width_round_trips_through_the_stream(tmp_path, bits):
    # hand-made widths from 0 to 8 per channel: the stream must carry each code exactly
    d, heads, total = 16, 1, bits * 16
    gen = torch.Generator().manual_seed(bits)
    widths = torch.zeros(1, d)
    widths[0, 0], widths[0, 1] = min(8, total), 0 if bits < 8 else 8
    remaining = total - int(widths[0, 0]) - int(widths[0, 1])
    for i in range(2, d):
        left = d - i - 1
        lo, hi = max(0, remaining - 8 * left), min(8, remaining)
        widths[0, i] = int(torch.randint(lo, hi + 1, (), generator=gen))
        remaining -= int(widths[0, i])
    assert int(widths.sum()) == total
    levels = torch.arange(256).float().expand(heads, d, 256).contiguous()
    path = codebooks.write(tmp_path / "w.safetensors", {"a.alloc.widths": widths,
                                                        "a.alloc.levels": levels}, {})
    p = kvq.build(f"alloc({bits},source={path}#a)")
    top = (2 ** widths.long()) - 1
    x = (torch.rand(3, 1, 9, d, generator=torch.Generator().manual_seed(0)) * (top + 1)).floor()
    assert torch.equal(p.roundtrip(x), x)


def test_klt_is_invertible_and_follows_folded_heads(tmp_path):
    path = fitted(tmp_path, 3)
    t = kvq.build(f"klt(source={path}#L0.k)>ptok>int8").transforms[0]
    x = anisotropic(1, 2, 64, 64, seed=5)
    y, meta = t.forward(x.clone())
    assert meta == {} and torch.allclose(t.inverse(y, meta), x, atol=1e-4)
    p = kvq.build(f"{with_source('nsep>klt>alloc(3)', f'{path}#L0.k')}")
    assert torch.equal(p.roundtrip(fold_blocks(x, 16)).reshape(x.shape), p.roundtrip(x))


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_head_dims_odd_seq_and_zeros(tmp_path, d, dtype):
    path = fitted(tmp_path, 2, d=d, heads=1)
    p = kvq.build(with_source("nsep>klt>alloc(2)", f"{path}#L0.k"))
    x = anisotropic(1, 1, 33, d, seed=7, dtype=dtype)
    x[0, 0, 5] = 0
    y = p.roundtrip(x)
    assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()
    assert torch.equal(y[0, 0, 5], torch.zeros(d, dtype=dtype))  # zero vectors stay zero
    assert sqnr_db(x.float(), y.float()) > 10
    assert p.bits_per_element(head_dim=d, seq=33) == pytest.approx(2 + 16 / d)


def test_beats_a_fixed_codebook_at_the_same_bits(tmp_path):
    path = fitted(tmp_path, 3, levels="kmeans")
    x = anisotropic(1, 2, 256, 64, seed=11)  # same distribution, unseen samples
    tc = kvq.build(with_source("nsep>klt>alloc(3)", f"{path}#L0.k"))
    fixed = kvq.build("nsep>rot>lloyd3(none)")
    assert tc.bits_per_element(64, 32) == fixed.bits_per_element(64, 32) == 3.25
    assert sqnr_db(x, tc.roundtrip(x)) > sqnr_db(x, fixed.roundtrip(x)) + 6


def test_sensitivity_moves_bits_to_the_weighted_channels():
    x = anisotropic(1, 1, 2000, 16, seed=3)
    plain, weighted = TransformFit("klt>alloc(2)"), TransformFit("klt>alloc(2)")
    plain.add(x)
    s = torch.ones_like(x)
    s[..., 0] = 1e4  # the loss depends almost only on channel 0
    weighted.add(x, s)
    a, b = plain.fit(), weighted.fit()
    basis = a["klt.basis"][0]
    along = basis[0].abs().argmax()  # the basis vector closest to channel 0
    assert b["alloc.widths"][0, along] > a["alloc.widths"][0, along]


def test_file_errors(tmp_path):
    path = fitted(tmp_path, 3, heads=2)
    with pytest.raises(kvq.SpecError, match="needs fitted parameters"):
        kvq.build("nsep>klt>alloc(3)")
    with pytest.raises(kvq.SpecError, match="spend 192 bits"):
        kvq.build(f"alloc(2,source={path}#L0.k)")
    with pytest.raises(kvq.SpecError, match="not in"):
        kvq.build(f"klt(source={path}#L9.k)>ptok>int8")
    with pytest.raises(kvq.SpecError, match="does not exist"):
        kvq.build(f"klt(source={tmp_path}/nope.safetensors#L0.k)>ptok>int8")
    p = kvq.build(f"alloc(3,source={path}#L0.k)")
    with pytest.raises(kvq.KVQError, match="2 kv heads"):
        p.quantize(torch.randn(1, 3, 8, 64))
    with pytest.raises(kvq.SpecError, match="head_dim 64"):
        p.quantizer.check_model(num_layers=1, head_dim=128) if False else \
            kvq.KVConfig.from_dict({"kv": f"alloc(3,source={path}#L0.k)"}).check(
                num_layers=1, head_dim=128)
    bad = codebooks.write(tmp_path / "bad.safetensors", {
        "a.klt.mean": torch.zeros(1, 8), "a.klt.basis": torch.ones(1, 8, 8)}, {})
    with pytest.raises(kvq.SpecError, match="orthonormal"):
        kvq.build(f"klt(source={bad}#a)>ptok>int8")


def test_a_recipe_name_says_how_to_calibrate():
    with pytest.raises(kvq.SpecError, match=r"calibration recipe.*kvq calibrate --recipe tc3"):
        kvq.kv("tc3")
    assert kvq.kv("kvquant3").label == "kvquant3"  # a preset of the same family stays a preset
