"""TurboQuant presets against vLLM 0.33's own code: ``centroids.py`` and ``config.py`` (run as
vendored) and the store kernel ``triton_turboquant_store.py`` (vendored, run in the Triton
interpreter on CPU). Rows "TurboQuant ..." of docs/parity.md."""

import pytest
import torch
from oracles import HEAD_DIMS, inputs, vllm_store_module

import kvq
from kvq.quantizers import unpack
from kvq.transforms.rot import rotation_matrix

# kvq preset -> vLLM --kv-cache-dtype (turboquant2 has no vLLM counterpart)
NAMES = {"turboquant-k8v4": "turboquant_k8v4", "turboquant4": "turboquant_4bit_nc",
         "turboquant-k3v4": "turboquant_k3v4_nc", "turboquant3": "turboquant_3bit_nc"}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_is_vllms_get_centroids(vllm_centroids, bits):
    for d in HEAD_DIMS:
        ours = kvq.build(f"lloyd{bits}(none,vllm)").quantizer.codebook(d)
        assert torch.equal(ours, vllm_centroids.get_centroids(d, bits)), f"d={d}"


def test_exact_density_codebooks_are_not_vllms(vllm_centroids):
    """kvq's own converged codebooks (beta, gaussian) differ from vLLM's, as docs/formats.md
    says: vLLM's trapezoid integration leaves 0.06-0.07% (relative) on the Gaussian levels."""
    for bits in (2, 3, 4):
        theirs = vllm_centroids.get_centroids(128, bits)
        gauss = kvq.build(f"lloyd{bits}(none,gaussian)").quantizer.codebook(128)
        rel = ((gauss - theirs).abs() / theirs.abs()).max().item()
        assert 4e-4 < rel < 1e-3, rel


def test_presets_are_vllms_tq_presets(vllm_config):
    assert set(vllm_config.TQ_PRESETS) == set(NAMES.values())
    for ours, theirs in NAMES.items():
        src, cfg = vllm_config.TQ_PRESETS[theirs], kvq.kv(ours)
        assert cfg.keys.bits == src["key_quant_bits"]
        assert cfg.values.bits == src["value_quant_bits"]
        nsep = [t for t in cfg.keys.transforms if t.type == "nsep"]
        assert (nsep[0].renorm if nsep else False) == src["norm_correction"]
        for d in (64, 128, 256):
            tq = vllm_config.TurboQuantConfig.from_cache_dtype(theirs, d)
            assert cfg.keys.nbytes(1, d) == tq.key_packed_size
            assert cfg.values.nbytes(1, d) == tq.value_packed_size


@pytest.mark.parametrize("name", [*NAMES, "turboquant2"])
def test_skip_rule_is_get_boundary_skip_layers(vllm_config, name):
    class Text:
        num_hidden_layers = 0

    class ModelConfig:
        is_hybrid = False
        hf_text_config = Text()

    cfg = kvq.kv(name)
    for layers in range(1, 13):
        Text.num_hidden_layers = layers
        theirs = vllm_config.TurboQuantConfig.get_boundary_skip_layers(ModelConfig())
        assert sorted(cfg.skipped(layers)) == [int(i) for i in theirs], f"{layers} layers"


def _unpack_slot(raw: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """vLLM's packing of d codes (4 bits: two per byte, low nibble first; 3 bits: 8 codes in
    3 little-endian bytes) -> (rows, d) int64."""
    raw = raw.long()
    if bits == 4:
        return torch.stack([raw & 0xF, raw >> 4], dim=-1).reshape(-1, d)
    w = raw.reshape(-1, d // 8, 3)
    word = w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16)
    return torch.stack([(word >> (3 * i)) & 7 for i in range(8)], dim=-1).reshape(-1, d)


def _fp16(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float16).float().reshape(-1)


def vllm_store(name: str, k: torch.Tensor, v: torch.Tensor, vllm_config, vllm_centroids):
    """Run vLLM's store kernel on k, v (1, H, T, D); return its slots decoded into
    (key codes or fp8 bytes, key norm or None, value codes, value scale, value zero)."""
    store = vllm_store_module()
    _, h, t, d = k.shape
    tq = vllm_config.TurboQuantConfig.from_cache_dtype(NAMES[name], d)
    c = vllm_centroids.get_centroids(d, tq.centroid_bits)
    cache = torch.zeros(1, t, h, tq.slot_size_aligned, dtype=torch.uint8)
    store.triton_turboquant_store(
        k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous(), cache,
        torch.arange(t, dtype=torch.int32), rotation_matrix(d), (c[1:] + c[:-1]) / 2,
        tq.mse_bits, tq.key_packed_size, tq.value_quant_bits, key_fp8=tq.key_fp8)
    slots = cache[0].transpose(0, 1).reshape(h * t, -1)  # rows in kvq's (head, token) order
    kps, vdb = tq.key_packed_size, tq.key_packed_size + (d * tq.value_quant_bits + 7) // 8
    if tq.key_fp8:
        keys, norm = slots[:, :d], None
    else:
        keys = _unpack_slot(slots[:, : kps - 2], tq.key_quant_bits, d)
        norm = _fp16(slots[:, kps - 2: kps])
    values = _unpack_slot(slots[:, kps:vdb], tq.value_quant_bits, d)
    return keys, norm, values, _fp16(slots[:, vdb: vdb + 2]), _fp16(slots[:, vdb + 2: vdb + 4])


# vLLM's Hadamard needs a power-of-two head_dim
CASES = [(128, torch.float32), (64, torch.bfloat16), (256, torch.float16)]


def stacked(d, dtype):
    """Every parity input for (d, dtype), concatenated along tokens, and each row's kind."""
    xs = inputs(d, dtype, seq=9)
    kinds = [k for k, x in xs.items() for _ in range(x.shape[1] * x.shape[2])]
    x = torch.cat(list(xs.values()), dim=-2)
    order = torch.arange(len(kinds)).reshape(len(xs), 2, 9).transpose(0, 1).reshape(-1)
    return x, [kinds[i] for i in order]  # rows in (head, token) order


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("d, dtype", CASES, ids=[f"D{d}-{str(t)[6:]}" for d, t in CASES])
def test_store_path_is_vllms_kernel(vllm_config, vllm_centroids, name, d, dtype):
    cfg = kvq.kv(name)
    x, kinds = stacked(d, dtype)
    k, v = x * 3, x.flip(-2)
    keys, norm, values, scale, zero = vllm_store(name, k, v, vllm_config, vllm_centroids)
    qk, qv = cfg.keys.quantize(k, backend="torch"), cfg.values.quantize(v, backend="torch")
    ours = unpack(qk.codes, cfg.keys.bits, d).reshape(-1, d)
    if norm is None:
        # fp8 keys: the Triton interpreter emulates the cast without round-to-nearest-even
        # (numpy bit slicing), so the GPU's cvt.rn.satfinite.e4m3x2.f32 is transcribed
        keys = k.float().clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        keys = keys.reshape(-1, d).long()
    else:
        assert torch.equal(qk.meta["norm"].float().reshape(-1), norm), "key norms differ"
    bad = (ours.long() != keys).any(dim=-1)
    assert not bad.any(), f"key codes differ on {bad.float().mean():.1%} of rows, " \
                          f"first a {kinds[int(bad.nonzero()[0])]} row"
    bad = (unpack(qv.codes, cfg.values.bits, d).reshape(-1, d).long() != values).any(dim=-1)
    assert not bad.any(), f"value codes differ on {bad.float().mean():.1%} of rows, " \
                          f"first a {kinds[int(bad.nonzero()[0])]} row"
    assert torch.equal(qv.meta["scale"].float().reshape(-1), scale), "value scales differ"
    assert torch.equal(qv.meta["zero"].float().reshape(-1), zero), "value mins differ"


@pytest.mark.parametrize("d", [96, 192])
def test_values_at_other_head_dims(vllm_config, vllm_centroids, d):
    """vLLM's value path does not need a power-of-two head_dim (its keys do)."""
    cfg = kvq.kv("turboquant-k3v4")
    x, _ = stacked(d, torch.float16)
    _, _, values, scale, zero = vllm_store("turboquant-k8v4", x, x, vllm_config, vllm_centroids)
    qv = cfg.values.quantize(x, backend="torch")
    assert torch.equal(unpack(qv.codes, 4, d).reshape(-1, d).long(), values)
    assert torch.equal(qv.meta["scale"].float().reshape(-1), scale)
    assert torch.equal(qv.meta["zero"].float().reshape(-1), zero)


def test_fp8_keys_saturate_like_vllm():
    """Beyond 448 vLLM's cast saturates (PTX cvt.rn.satfinite); kvq's k8v4 keys do too."""
    k = torch.tensor([500.0, -1e4, 448.0, 464.0, 1.0]).reshape(1, 1, 1, 5)
    q = kvq.kv("turboquant-k8v4").keys.quantize(k, backend="torch")
    out = q.codes.view(torch.float8_e4m3fn).float().reshape(-1)[:5]
    assert out.tolist() == [448.0, -448.0, 448.0, 448.0, 1.0]
    with pytest.raises(kvq.NumericsError, match="exceeds"):
        kvq.build("fp8(e4m3,none)").quantize(k)
