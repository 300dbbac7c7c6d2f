"""nuq: nearest calibrated level after min-max (or static) normalization; codebook-file errors."""

import pytest
import torch

import kvq
from kvq import codebooks
from kvq.calibration import fold_blocks
from kvq.testing import DTYPES, HEAD_DIMS, kv_like, sqnr_db

LEVELS3 = torch.tensor([-0.9, -0.5, -0.22, -0.05, 0.1, 0.3, 0.6, 0.95])


@pytest.fixture
def book(tmp_path):
    """A codebook file: 3-bit levels 'a', 2-bit levels 'b', static scales for 'a' at 2 heads x
    head_dim 64."""
    g = torch.Generator().manual_seed(0)
    path = codebooks.write(tmp_path / "cb.safetensors", {
        "a": LEVELS3, "b": torch.tensor([-0.7, -0.1, 0.2, 0.8]),
        "a.zero": torch.randn(2, 64, generator=g) * 0.1,
        "a.scale": torch.rand(2, 64, generator=g) + 2.0,
    }, {"model": "unit", "num_layers": 2, "head_dim": 64})
    return path


def brute(v, levels):
    return (v[..., None] - levels).abs().argmin(dim=-1)


@pytest.mark.parametrize("gran", ["ptok", "pchan", "group(16)", "group(8,token)"])
def test_minmax_codes_are_the_nearest_level(book, gran):
    p = kvq.build(f"{gran}>nuq(3,source={book}#a)")
    x = kv_like(1, 2, 24, 64, seed=1)
    q = p.quantize(x)
    y = p.dequantize(q)
    g = p.granularity
    xg = g.view(x.clone())
    hi, lo = xg.amax(g.reduce_dim, keepdim=True), xg.amin(g.reduce_dim, keepdim=True)
    s = g.from_meta(q.meta["scale"].float())
    z = g.from_meta(q.meta["zero"].float())
    assert torch.allclose(s, (hi - lo) / 2, rtol=1e-3) and torch.allclose(z, (hi + lo) / 2,
                                                                            atol=1e-2, rtol=1e-3)
    codes = brute((xg - z) / s, LEVELS3)
    want = g.unview(LEVELS3[codes] * s + z, x.shape)
    assert torch.allclose(y, want, atol=1e-5)
    assert q.nbytes == 2 * p.nbytes(24, 64)


def test_static_scales_per_head_and_folded_blocks(book):
    p = kvq.build(f"nuq(3,scale=static,source={book}#a)")
    zero, scale = codebooks.static_scales(book, "a")
    x = kv_like(2, 2, 64, 64, seed=2)
    y = p.roundtrip(x)
    want = LEVELS3[brute((x - zero[None, :, None]) / scale[None, :, None], LEVELS3)]
    assert torch.allclose(y, want * scale[None, :, None] + zero[None, :, None], atol=1e-5)
    folded = fold_blocks(x, 16)  # (2, 2 * 4, 16, 64): head-major, as the HF cache folds blocks
    assert torch.equal(p.roundtrip(folded).reshape(x.shape), y)
    assert p.bits_per_element(64, 32) == 3.0  # nothing stored per block
    with pytest.raises(kvq.KVQError, match="2 kv heads"):
        p.quantize(kv_like(1, 3, 8, 64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_dtypes_and_head_dims(book, dtype, head_dim):
    p = kvq.build(f"sparse(0.01)>ptok>nuq(3,source={book}#a)")
    x = kv_like(1, 3, 37, head_dim, dtype=dtype)
    y = p.roundtrip(x)
    assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()
    assert sqnr_db(x.float(), y.float()) > 8  # ptok on 4 outlier channels x20
    flat = torch.full((1, 1, 5, head_dim), 0.75, dtype=dtype)
    assert torch.equal(p.roundtrip(flat), flat)  # constant groups decode exactly


def test_round_trips(book, tmp_path, monkeypatch):
    import hashlib

    spec = f"sparse(0.01,channel)>pchan>nuq(3,source={book}#a)"
    p = kvq.build(spec)
    digest = hashlib.sha256(book.read_bytes()).hexdigest()  # the file's content is pinned
    assert p.to_spec() == spec[:-1] + f",sha256={digest})" and kvq.build(p.to_spec()) == p
    assert kvq.Pipeline.model_validate_json(p.model_dump_json()) == p
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("kv: ptok>nuq(3,source=../cb.safetensors#a)\n")
    monkeypatch.chdir("/")
    cfg = kvq.load(tmp_path / "sub" / "c.yaml")  # relative to the YAML file, not the cwd
    assert cfg.keys.quantizer.file == book.resolve()
    assert cfg.keys.quantizer.calibration["model"] == "unit"


@pytest.mark.parametrize("spec, match", [
    ("ptok>nuq(3)", "needs a calibrated codebook"),
    ("ptok>nuq(2,source={book}#a)", "has 8 levels, but 2 bits need 4"),
    ("ptok>nuq(3,source={book}#zz)", "'zz' is not in"),
    ("ptok>nuq(3,source={book})", "not FILE#NAME"),
    ("ptok>nuq(3,source={missing}#a)", "does not exist"),
    ("ptok>nuq(2,scale=static,source={book}#b)", "no static scales"),
])
def test_codebook_errors(book, tmp_path, spec, match):
    with pytest.raises(kvq.SpecError, match=match):
        kvq.build(spec.format(book=book, missing=tmp_path / "missing.safetensors"))


def test_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(kvq.SpecError, match="not a readable safetensors"):
        kvq.build(f"ptok>nuq(3,source={bad}#a)")
    from safetensors.torch import save_file

    foreign = tmp_path / "weights.safetensors"
    save_file({"a": LEVELS3}, str(foreign))
    with pytest.raises(kvq.SpecError, match="not a kvq codebook file"):
        kvq.build(f"ptok>nuq(3,source={foreign}#a)")
    unsorted = codebooks.write(tmp_path / "u.safetensors", {"a": LEVELS3.flip(0)}, {})
    with pytest.raises(kvq.SpecError, match="strictly increasing"):
        kvq.build(f"ptok>nuq(3,source={unsorted}#a)")


def test_other_model_geometry_is_refused(book):
    cfg = kvq.kv({"kv": f"ptok>nuq(3,source={book}#a)"})
    cfg.check(num_layers=2, head_dim=64)
    with pytest.raises(kvq.SpecError, match="calibrated for unit .2 layers"):
        cfg.check(num_layers=30, head_dim=64)
    with pytest.raises(kvq.SpecError, match="head_dim 128"):
        cfg.check(num_layers=2, head_dim=128)


def test_triton_refuses_nuq(book):
    from kvq.backends.triton.plan import KernelPlan, Unsupported

    with pytest.raises(Unsupported, match="nuq"):
        KernelPlan.from_pipeline(kvq.build(f"ptok>nuq(3,source={book}#a)"))
