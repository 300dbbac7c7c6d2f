"""The TurboQuant / FP8 / FP4 presets against their sources: vLLM's TurboQuant config and store
kernel (re-written here in torch), and the bits each stores."""

import math

import pytest
import torch

import kvq
from kvq.quantizers import unpack
from kvq.quantizers.lloyd import lloyd_max
from kvq.transforms.rot import rotation_matrix

# vllm/model_executor/layers/quantization/turboquant/config.py, TQ_PRESETS
TQ_PRESETS = {
    "turboquant-k8v4": dict(key_quant_bits=8, value_quant_bits=4, norm_correction=False),
    "turboquant4": dict(key_quant_bits=4, value_quant_bits=4, norm_correction=True),
    "turboquant-k3v4": dict(key_quant_bits=3, value_quant_bits=4, norm_correction=True),
    "turboquant3": dict(key_quant_bits=3, value_quant_bits=3, norm_correction=True),
}


def vllm_packed_bytes(head_dim, key_bits, value_bits):
    """TurboQuantConfig.key_packed_size / value_packed_size: bytes per token and head."""
    key = head_dim if key_bits == 8 else math.ceil(head_dim * key_bits / 8) + 2  # + fp16 norm
    return key, math.ceil(head_dim * value_bits / 8) + 4  # + fp16 scale and zero


@pytest.mark.parametrize("name", TQ_PRESETS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_turboquant_presets_store_what_vllm_stores(name, head_dim):
    src = TQ_PRESETS[name]
    cfg = kvq.kv(name)
    assert cfg.skip == (0, 1, -2, -1)  # vLLM's boundary layers, n = 2
    assert cfg.keys.bits == src["key_quant_bits"] and cfg.values.bits == src["value_quant_bits"]
    nsep = [t for t in cfg.keys.transforms if t.type == "nsep"]
    if src["key_quant_bits"] != 8:
        assert nsep[0].renorm == src["norm_correction"]
    key, value = vllm_packed_bytes(head_dim, src["key_quant_bits"], src["value_quant_bits"])
    assert cfg.keys.nbytes(1, head_dim) == key and cfg.values.nbytes(1, head_dim) == value


def vllm_mse_keys(k: torch.Tensor, bits: int):
    """vLLM's MSE key path for rows k (N, D): store (_tq_fused_store_mse with NORM_CORRECTION)
    and the decode it implies: y = (k / ||k||) @ PiT, idx = #(y >= midpoints), stored norm =
    fp16(||k|| / ||c[idx]||), k_hat = c[idx] @ PiT^T * stored."""
    d = k.shape[-1]
    c = lloyd_max(bits, d, "gaussian")  # its centroids.py codebook (test_lloyd checks the match)
    pit = rotation_matrix(d)  # Hadamard
    n = k.norm(dim=-1, keepdim=True)
    y = (k / n) @ pit
    idx = (y[..., None] >= ((c[1:] + c[:-1]) / 2)).sum(dim=-1)
    cv = c[idx]
    stored = (n / cv.norm(dim=-1, keepdim=True)).half().float()
    return idx, (cv @ pit.T) * stored


@pytest.mark.parametrize("bits", [3, 4])
def test_turboquant_keys_match_vllms_store_kernel(bits):
    g = torch.Generator().manual_seed(bits)
    k = torch.randn(1, 2, 50, 128, generator=g) * torch.rand(1, 2, 50, 1, generator=g) * 4
    p = kvq.build(f"nsep>rot>lloyd{bits}(none,gaussian)")
    q = p.quantize(k)
    idx, ref = vllm_mse_keys(k.reshape(-1, 128), bits)
    codes = unpack(q.codes, bits, 128).reshape(-1, 128).long()
    assert (codes != idx).float().mean() < 1e-3  # equal up to fp32 rounding at a midpoint
    ours = p.dequantize(q).reshape(-1, 128)
    same = (codes == idx).all(dim=-1)
    rel = ((ours - ref).norm(dim=-1) / ref.norm(dim=-1))[same]
    assert rel.max() < 2e-3  # fp16 rounding of ||k|| (kvq) vs of ||k|| / ||c|| (vLLM)


def vllm_values(v: torch.Tensor, bits: int) -> torch.Tensor:
    """_store_quantized_value + its decode: per-token min / max, fp32 scale for the codes,
    floor(x + 0.5), fp16 scale and zero stored."""
    levels = 2**bits - 1
    lo, hi = v.amin(dim=-1, keepdim=True), v.amax(dim=-1, keepdim=True)
    s = ((hi - lo) / levels).clamp_min(1e-8)
    q = ((v - lo) / s + 0.5).floor().clamp(0, levels)
    return q * s.half().float() + lo.half().float(), s


@pytest.mark.parametrize("bits", [3, 4])
def test_turboquant_values_match_vllms_uniform_quantizer(bits):
    v = torch.randn(2, 3, 40, 64, generator=torch.Generator().manual_seed(0))
    ours = kvq.build(f"ptok>int{bits}(asym)").roundtrip(v)
    ref, s = vllm_values(v, bits)
    # kvq rounds half to even with the stored fp16 scale; vLLM half up with the fp32 one:
    # the same level almost everywhere, never more than one level apart
    diff = (ours - ref).abs()
    assert (diff > 1e-3 * s).float().mean() < 0.01 and (diff <= 1.01 * s).all()


def test_turboquant_family_bits_with_compare():
    from kvq.eval import pipelines

    got = pipelines.expand(["turboquant4"], [4, 3, 2])
    assert list(got) == ["fp16", "turboquant4", "turboquant3", "turboquant2"]
    spec = pipelines.expand(["nsep>rot>lloyd4(none)"], [3])
    assert [c.keys.to_spec() for c in spec.values()][1] == "nsep>rot>lloyd3(none)"
    with pytest.raises(kvq.KVQError, match="no 8-bit variant"):
        pipelines.expand(["turboquant4"], [8])


@pytest.mark.parametrize("name, b64, b128", [
    ("fp8", 8 + 32 / 2048, 8 + 32 / 4096), ("fp8-e5m2", 8 + 32 / 2048, 8 + 32 / 4096),
    ("nvfp4", 4.5 + 32 / 2048, 4.5 + 32 / 4096), ("mxfp4", 4.25, 4.25),
])
def test_hardware_float_presets_bits_per_32_token_block(name, b64, b128):
    cfg = kvq.kv(name)
    assert cfg.bits_per_element(64, 32) == b64 and cfg.bits_per_element(128, 32) == b128
