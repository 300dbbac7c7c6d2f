"""Triton backend vs the torch reference: same codes, same metadata, same dequantized values.

Runs the kernels in the Triton interpreter on CPU (tests/backends/conftest.py sets
TRITON_INTERPRET=1); with TRITON_INTERPRET=0 on a CUDA machine the same tests run on the GPU.
The interpreter is slow, so the seed pipeline gets the full shape matrix and every other
pipeline a diagonal through it.

Parity rules: metadata within one ulp of its dtype (8 ulp for float32 metadata, still far inside
one float16 ulp); integer codes identical, except that a code may move by one where the
reference's value before rounding sits within 1e-3 of a tie (float32 reductions and matmuls
are summed in another order); dequantizing the same codes agrees within a per-dtype tolerance.
llama.cpp's q4_0 / q4_1 / q8_0 without a transform: codes and metadata identical.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import kvq  # noqa: E402
from kvq.backends import get_backend  # noqa: E402
from kvq.errors import BackendError, NumericsError  # noqa: E402
from kvq.quantizers.packing import pack, unpack  # noqa: E402
from kvq.testing import HEAD_DIMS, edge_blocks, kv_like  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("0", "")
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SEQS = (1, 7, 33, 1000)
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
META_ULPS = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 8}

FULL = "nsep>pchan>int4"
DIAGONAL = [
    "ptok>int4", "ptok>int2(asym)", "ptok>int8", "ptok>int3(asym)",
    "nsep>ptok>int3", "nsep(renorm=false)>ptok>int2(asym)",
    "pchan>int8(asym)", "pchan>int2", "nsep>pchan>int3(asym)",
    "group(16)>int4(asym)", "group(32)>int2", "group(16)>int8(asym)",
    "group(32,token)>int4(asym)", "group(32,token)>int2", "group(64,token)>int8",
    "rot>ptok>int4(asym)", "rot(random)>ptok>int8", "nsep>rot>pchan>int3",
    "rot>nsep>group(16)>int2(asym)", "nsep(bf16)>pchan>int4(dtype=bf16)",
    "nsep(fp32)>ptok>int4(asym,dtype=fp32)",
    "q4_0", "q4_1", "q8_0", "rot>q4_0", "nsep>rot(hadamard,block=32)>q4_1", "rot>nsep>q8_0",
]


def _shape_id(d, t, b, dtype):
    return f"D{d}-T{t}-B{b}-{str(dtype).removeprefix('torch.')}"


def _full_cases():
    for d in HEAD_DIMS:
        for t in SEQS[1:]:  # pchan needs >= 2 tokens
            for b in (1, 3):
                for dtype in DTYPES:
                    yield pytest.param(FULL, d, t, b, dtype,
                                       id=f"{FULL}-{_shape_id(d, t, b, dtype)}")


def _diagonal_cases(per_pipeline=3):
    """Each pipeline meets `per_pipeline` shapes, cycling head_dim, seq, batch and dtype."""
    for i, spec in enumerate(DIAGONAL):
        p = kvq.build(spec)
        seqs = SEQS[1:] if p.token_axis_stats else SEQS
        group = p.granularity.size if p.granularity.type == "group" else 1
        for j in range(per_pipeline):
            k = i + 2 * j
            d = next(d for d in HEAD_DIMS[k % 5:] + HEAD_DIMS if d % group == 0)
            t, b, dtype = seqs[(i + j) % len(seqs)], (1, 3)[(i + j) % 2], DTYPES[(i + j) % 3]
            yield pytest.param(spec, d, t, b, dtype, id=f"{spec}-{_shape_id(d, t, b, dtype)}")


def _pre_round(p, x, meta):
    """The reference's values just before rounding (codes are round(v) before offset/clamp)."""
    h = x.to(torch.float32, copy=True)  # transforms may work in place
    for t in p.transforms:
        h, _ = t.forward(h)
    g = p.granularity
    if hasattr(p.quantizer, "block_scale"):  # llama.cpp formats: codes use the fp32 scale
        hg = g.view(h)
        d, _ = p.quantizer.block_scale(hg)  # (q4_1 subtracts the block minimum from hg)
        return g.unview(hg * torch.where(d == 0, 0, 1 / d), h.shape)
    s = g.expand(meta["scale"].float(), h.shape)
    s = torch.where(s == 0, torch.ones_like(s), s)
    if "zero" in meta:
        return (h - g.expand(meta["zero"].float(), h.shape)) / s
    return h / s


def _ordered(t):
    """Float bit patterns mapped to integers that are consecutive for adjacent floats."""
    i = t.view(INT_VIEW[t.dtype]).long()
    sign = torch.iinfo(INT_VIEW[t.dtype]).max
    return torch.where(i < 0, -(i & sign), i)


def assert_parity(p, x):
    ref = p.quantize(x, backend="torch")
    tri = p.quantize(x, backend="triton")
    assert (tri.shape, tri.dtype, tri.bits) == (ref.shape, ref.dtype, ref.bits)
    assert tri.codes.shape == ref.codes.shape and tri.codes.dtype == torch.uint8
    assert list(tri.meta) == list(ref.meta)
    for k in ref.meta:
        a, b = tri.meta[k], ref.meta[k]
        assert a.shape == b.shape and a.dtype == b.dtype, k
        ulps = (_ordered(a) - _ordered(b)).abs().max().item()
        assert ulps <= META_ULPS[a.dtype], f"{k} differs by {ulps} ulp"

    d = x.shape[-1]
    u_tri, u_ref = unpack(tri.codes, p.bits, d).int(), unpack(ref.codes, p.bits, d).int()
    assert torch.equal(pack(u_tri.to(torch.uint8), p.bits), tri.codes), "padding codes not zero"
    moved = u_tri != u_ref
    if moved.any():
        assert (u_tri - u_ref).abs().max() == 1
        v = _pre_round(p, x, ref.meta)[moved]
        gap = ((v - v.floor()) - 0.5).abs()
        assert (gap < 1e-3).all(), f"codes differ away from a rounding tie: {gap.max():.3g}"
        assert moved.float().mean() < 1e-3

    # dequantizing the same codes
    out, exp = p.dequantize(ref, backend="triton"), p.dequantize(ref, backend="torch")
    assert out.dtype == x.dtype and out.shape == x.shape
    tol = RTOL[x.dtype]
    torch.testing.assert_close(out.float(), exp.float(), rtol=tol,
                               atol=tol * exp.float().abs().max().item())


@pytest.mark.parametrize("spec,d,t,b,dtype", [*_full_cases(), *_diagonal_cases()])
def test_parity(spec, d, t, b, dtype):
    x = kv_like(b, 1 if t == 1000 else 2, t, d, dtype=dtype, seed=d + t + b).to(DEVICE)
    assert_parity(kvq.build(spec), x)


def _preset_specs():
    specs = set()
    for cfg in kvq.presets().values():
        specs |= {cfg.keys.to_spec(), cfg.values.to_spec()}
    return sorted(specs)


@pytest.mark.parametrize("spec", _preset_specs())
def test_presets(spec):
    p = kvq.build(spec)
    x = kv_like(2, 2, 40, 64, dtype=torch.float16, seed=1).to(DEVICE)
    reason = get_backend("triton").why_unsupported(p, x)
    if any(t.type not in ("nsep", "rot") for t in p.transforms):  # e.g. a plugin's transform
        assert reason and "transforms" in reason
        assert p.quantize(x).codes.shape == p.quantize(x, backend="torch").codes.shape
        return
    if p.quantizer.type not in KERNEL_QUANTIZERS:
        assert_falls_back(p, x, "has no kernel")
        return
    if getattr(p.quantizer, "rounding", "even") != "even" or \
            getattr(p.quantizer, "overflow", "raise") != "raise":  # vLLM's options: torch only
        assert_falls_back(p, x, "runs on torch")
        return
    assert reason is None
    if p.is_identity:
        assert torch.equal(p.roundtrip(x, backend="triton"), x)
    elif p.quantizer.type == "lloyd":  # no scale to compare codes by (test_triton_codebook.py)
        torch.testing.assert_close(p.roundtrip(x, backend="triton").float(),
                                   p.roundtrip(x, backend="torch").float(),
                                   rtol=1e-3, atol=1e-3 * x.abs().max().item())
    elif p.quantizer.type in ("fp8", "fp4"):  # bit-exact (test_triton_formats.py)
        ref, tri = p.quantize(x, backend="torch"), p.quantize(x, backend="triton")
        assert torch.equal(tri.codes, ref.codes)
        assert all(torch.equal(tri.meta[k], ref.meta[k]) for k in ref.meta)
        assert torch.equal(p.dequantize(ref, backend="triton"), p.dequantize(ref))
    else:
        assert_parity(p, x)


@pytest.mark.parametrize("spec,d,t", [
    ("nsep>pchan>int4", 128, 300),  # sequence streamed in tiles, two passes
    ("nsep>rot>pchan>int3(asym)", 64, 150),  # streamed, rotation in 32-wide chunks
    ("rot>nsep>ptok>int8", 256, 20),  # rotation in 16-wide chunks
    ("group(16,token)>int2(asym)", 64, 70),  # several token blocks per tile, partial last one
    ("group(24,token)>int4", 80, 60),  # token groups that are not a power of two
    ("group(256,token)>int3", 128, 300),  # token blocks larger than a tile
    ("group(16)>int4(asym)", 96, 50),  # many row tiles
])
def test_parity_with_gpu_tiles(monkeypatch, spec, d, t):
    """The GPU tile sizes (small tiles, streaming) run under the interpreter too."""
    from kvq.backends.triton import common

    monkeypatch.setattr(common, "GPU_TILES", True)
    assert_parity(kvq.build(spec), kv_like(1, 2, t, d, dtype=torch.float16, seed=t).to(DEVICE))


def test_ties_round_half_to_even():
    # absmax 7 -> scale exactly 1: values land exactly on .5 ties
    row = torch.tensor([7.0, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 4.5, -5.5, 6.5, 0.0, 5.0, 3.0,
                        -6.5, 1.0])
    x = row.repeat(1, 1, 3, 4).to(DEVICE)
    p = kvq.build("ptok>int4")
    tri = p.quantize(x, backend="triton")
    assert torch.equal(tri.codes, p.quantize(x, backend="torch").codes)
    out = p.dequantize(tri, backend="triton")[0, 0, 0, :16]
    assert torch.equal(out, torch.round(row).to(DEVICE))


@pytest.mark.parametrize("spec", ["nsep>pchan>int4", "group(16)>int4(asym)", "rot>nsep>ptok>int3"])
def test_zero_and_constant_groups(spec):
    x = kv_like(1, 2, 9, 64, seed=3)
    x[0, 0, 2] = 0  # a zero token: norm 0, scale 0
    x[0, 1, :, 5] = 0.25  # a constant channel: zero range for per-channel asym
    assert_parity(kvq.build(spec), x.to(DEVICE))


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_ggml_formats_bit_exact_with_torch(fmt):
    """Without a rotation the kernels' codes, fp16 scales and values equal the reference (which
    equals gguf.quants): zero blocks, |max| ties, exact halves, constants, a padded head_dim 96."""
    p = kvq.build(fmt)
    for x in (edge_blocks(), kv_like(2, 3, 9, 96, dtype=torch.bfloat16, seed=5)):
        ref, tri = p.quantize(x, backend="torch"), p.quantize(x.to(DEVICE), backend="triton")
        assert torch.equal(tri.codes.cpu(), ref.codes)
        assert all(torch.equal(tri.meta[k].cpu(), ref.meta[k]) for k in ref.meta)
        assert torch.equal(p.dequantize(tri, backend="triton").cpu(), p.dequantize(ref))


KERNEL_QUANTIZERS = ("int", "none", "lloyd", "q4_0", "q4_1", "q8_0", "fp8", "fp4")


def assert_falls_back(p, x, why):
    """An explicit backend="triton" raises BackendError naming why; auto runs the reference."""
    from kvq.backends import resolve_backend

    with pytest.raises(BackendError, match=why):
        p.quantize(x, backend="triton")
    assert resolve_backend("auto", p, x).name == "torch"
    assert torch.equal(p.roundtrip(x), p.roundtrip(x, backend="torch"))


def test_granularity_without_kernel_falls_back():
    assert_falls_back(kvq.build("phead>int4"), kv_like(1, 2, 12, 64).to(DEVICE),
                      "granularity 'phead' has no kernel for 'int4'")


def test_unsupported_pipeline_raises_why():
    x = kv_like(1, 1, 8, 48).to(DEVICE)
    with pytest.raises(BackendError, match="power-of-two group"):
        kvq.build("group(24)>int4").quantize(x, backend="triton")
    with pytest.raises(BackendError, match="head_dim 640"):
        kvq.build("ptok>int4").quantize(kv_like(1, 1, 4, 640).to(DEVICE), backend="triton")


def test_dequantize_any_channel_group():
    # group(24) has no quantize kernel, but the dequantize kernel reads any channel group
    p, x = kvq.build("group(24)>int4(asym)"), kv_like(2, 1, 5, 48, seed=2).to(DEVICE)
    q = p.quantize(x, backend="torch")
    torch.testing.assert_close(p.dequantize(q, backend="triton"), p.dequantize(q, backend="torch"))


def test_cpu_tensor_without_interpreter_says_why(monkeypatch):
    backend = get_backend("triton")
    monkeypatch.setattr(type(backend), "interpreted", property(lambda self: False))
    reason = backend.why_unsupported(kvq.build("ptok>int4"), torch.zeros(1, 1, 2, 64))
    assert "CUDA" in reason and "TRITON_INTERPRET" in reason


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN/Inf
@pytest.mark.parametrize("spec", ["nsep>pchan>int4", "rot>group(16)>int4(asym)",
                                  "ptok>int8(dtype=fp32)", "group(16,token)>int2", "q4_0",
                                  "pchan>fp8", "fp8(e5m2,none)", "group(16)>fp4(nv)",
                                  "phead>fp4(mx)", "group(16,token)>lloyd4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_raises(spec, bad):
    """The kernels' max/min skip NaN, so the kernel itself must report non-finite input."""
    x = kv_like(1, 2, 32, 64).to(DEVICE)
    x[0, 1, 3, 7] = bad
    with pytest.raises(NumericsError, match="NaN or Inf"):
        kvq.build(spec).quantize(x, backend="triton")
    lax = kvq.Pipeline.model_validate({"steps": spec, "check_finite": False})
    lax.quantize(x[:, :1], backend="triton")  # the finite head: fine without the check


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_ggml_float16_maximum_raises_like_reference(fmt):
    x = torch.tensor([-65504.0] + [0.0] * 30 + [65504.0]).half().reshape(1, 1, 1, 32)
    with pytest.raises(NumericsError, match="past its maximum"):
        kvq.build(fmt).quantize(x.to(DEVICE), backend="triton")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's numpy
@pytest.mark.parametrize("spec,value", [("nsep>pchan>int4", 1e4), ("ptok>int8", 1e7),
                                        ("q8_0", 1e7), ("q4_1", 1e6)])
def test_float16_metadata_overflow_raises_like_reference(spec, value):
    x = torch.full((1, 1, 4, 64), value).to(DEVICE)
    with pytest.raises(NumericsError, match="overflows float16"):
        kvq.build(spec).quantize(x, backend="triton")


def test_kernels_compile_for_gpu():
    """The interpreter accepts code the GPU compiler rejects: compile for sm_90 too (no GPU)."""
    import triton

    if not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("this triton build ships no ptxas")
    from kvq.backends.triton.compile_check import EXTRA, PIPELINES

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kvq.backends.triton.compile_check"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("_dequantize_kernel") == len(PIPELINES) + len(EXTRA)


@pytest.mark.parametrize("config", ["nsep-pchan4", "kivi2", "nvfp4"])
def test_hf_cache_with_triton_backend_matches_torch(config):
    """KVQCache flushes and reads through the selected backend: same K/V as with torch."""
    import transformers as tf

    from kvq.hf import KVQCache

    cfg = tf.LlamaConfig(num_hidden_layers=1, hidden_size=128, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=64)  # head_dim 64
    steps = [kv_like(1, 2, 70, 64, seed=0)] + [kv_like(1, 2, 1, 64, seed=i) for i in range(1, 40)]
    outs = {}
    for backend in ("torch", "triton"):
        cache = KVQCache(config, cfg, residual=8, block=32, backend=backend)
        outs[backend] = [cache.update(x.to(DEVICE), -x.to(DEVICE), 0) for x in steps]
    assert not torch.equal(outs["triton"][-1][0][:, :, :64], steps[0][:, :, :64].to(DEVICE))
    for (k, v), (kt, vt) in zip(outs["torch"], outs["triton"]):
        torch.testing.assert_close(kt, k, rtol=1e-5, atol=1e-5 * k.abs().max().item())
        torch.testing.assert_close(vt, v, rtol=1e-5, atol=1e-5 * v.abs().max().item())
