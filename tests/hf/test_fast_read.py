"""The fast decode's block reads (kvq.hf.packed): unpacking, the read against the pipeline's own
dequantize, the nsep factor stored at write time or recomputed, and the step scratch."""

from __future__ import annotations

import pytest
import torch
from hf_models import VOCAB, tiny_model
from test_fast_attention import ATOL, _set, decode_logits, fast_vs_general, prompt

import kvq
from kvq.errors import KVQError
from kvq.hf import KVQCache, cache_kwargs, enable_fast_attention
from kvq.hf.blocks import BlockStore
from kvq.hf.packed import Scratch, StreamReader, unpack_into
from kvq.quantizers.packing import pack, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [8, 12, 20, 24, 64, 80, 96, 128, 256])
def test_unpack_into_equals_unpack(bits, dim):
    g = torch.Generator().manual_seed(dim + bits)
    codes = torch.randint(0, 2**bits, (2, 5, 7, dim), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    got = unpack_into(packed, bits, dim, Scratch(), "x") if bits != 8 else packed[..., :dim]
    assert torch.equal(got, unpack(packed, bits, dim))
    assert torch.equal(got, codes)


SPECS = ["nsep>pchan>int4", "pchan>int2(asym)", "nsep>ptok>int3", "group(8,token)>int4",
         "nsep(renorm=false)>group(16)>int8", "ptok>int4(asym)", "none"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_read_equals_pipeline_dequantize(spec, dim, dtype):
    """factor * d of every block (a 12-token tail block included) equals Pipeline.dequantize
    (no rotations here, so M = I) to fp32 rounding, with the factor stored or recomputed;
    fp16/bf16 to their rounding (the general path returns the model dtype, the read fp32)."""
    if "group(16)" in spec and dim % 16:
        pytest.skip("group(16) needs head_dim % 16 == 0")
    tol = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    pipe = kvq.build(spec)
    reader = StreamReader(pipe)
    g = torch.Generator().manual_seed(dim)
    x = (torch.randn(2, 3, 64 + 12, dim, generator=g) * 3).to(dtype)
    for derive in (None, reader.factors):
        store = BlockStore(pipe)
        store.append(x[:, :, :64], 32, derive=derive)
        store.append(x[:, :, 64:], 12, derive=derive)
        assert [bool(s.extra) for s in store.segments] == [derive is not None
                                                           and reader.renorm] * 2
        ref = torch.cat(store.dequantize(), dim=-2).float()
        parts = []
        for seg in store.segments:
            d, f = reader.chunk(seg, 0, seg.n, Scratch(), "kv")
            parts.append(d if f is None else d * f.unsqueeze(-1))
        torch.testing.assert_close(torch.cat(parts, dim=-2), ref, atol=tol, rtol=tol)


def test_stored_factors_are_counted_and_recompute_stores_none():
    model = tiny_model("llama")
    enable_fast_attention(model)
    try:
        caches = {f: KVQCache("nsep>pchan>int4", model.config, residual=2, block=4, factors=f)
                  for f in ("store", "recompute")}
        for cache in caches.values():
            decode_logits(model, cache, prompt(seq=23), 6, tokens=prompt(seq=6))
    finally:
        _set(model, "sdpa")
    stored, plain = (c.layers[0] for c in caches.values())
    assert all("factor" in s.extra for s in stored.k_store.segments + stored.v_store.segments)
    assert not any(s.extra for s in plain.k_store.segments + plain.v_store.segments)
    tokens = len(stored.k_store)
    b, h = stored.keys.shape[:2]
    extra = 2 * b * h * tokens * 4  # fp32 factor per token and head, K and V
    assert stored.memory()["quantized_bytes"] == plain.memory()["quantized_bytes"] + extra


@pytest.mark.parametrize("factors", ["store", "recompute"])
def test_factors_options_equal_the_general_path(factors, count_fast):
    got, ref = fast_vs_general(tiny_model("llama"), "nsep>pchan>int4", prompt(seq=45), steps=7,
                               residual=1, block=4, factors=factors)
    assert len(count_fast) == 7 * 2
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_blocks_written_without_factors_are_read_right(count_fast):
    """A cache filled while the model attended with SDPA holds no factors; once the model is
    on "kvq", new blocks store theirs (a segment merging both keeps none) and blocks without
    one are read with the norm recomputed."""
    model = tiny_model("llama")
    tokens = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    ids = prompt(seq=21)
    ref = decode_logits(model, KVQCache("nsep>pchan>int4", model.config, residual=1, block=4,
                                        attention="dequantize"), ids, 8, tokens=tokens)
    cache = KVQCache("nsep>pchan>int4", model.config, residual=1, block=4, factors="store")
    kw = cache_kwargs(model, cache)
    with torch.no_grad():
        out = [model(ids, use_cache=True, **kw).logits[:, -1]]
        assert not any(s.extra for s in cache.layers[0].k_store.segments)
        enable_fast_attention(model)
        try:
            for i in range(8):
                out.append(model(tokens[:, i:i + 1], use_cache=True, **kw).logits[:, -1])
        finally:
            _set(model, "sdpa")
    assert len(count_fast) == 8 * 2
    kinds = {bool(s.extra) for s in cache.layers[0].k_store.segments}
    assert kinds == {False, True}  # both kinds were read in the last steps
    torch.testing.assert_close(torch.stack(out, dim=1), ref, atol=ATOL, rtol=0)


def test_step_scratch_is_freed_after_the_last_layer():
    """The layers share one scratch during a decode forward; nothing is held between steps."""
    model = tiny_model("llama")
    enable_fast_attention(model)
    cache = KVQCache("nsep>pchan>int4", model.config, residual=1, block=4)
    step = cache.layers[0].fast.step
    assert all(layer.fast.step is step for layer in cache.layers)
    seen = []
    orig = step.get

    def spy():
        seen.append(orig())
        return seen[-1]

    step.get = spy
    try:
        decode_logits(model, cache, prompt(seq=13), 3, tokens=prompt(seq=3))
    finally:
        _set(model, "sdpa")
    assert len(seen) == 3 * len(cache.layers)
    assert all(s is seen[0] for s in seen[:len(cache.layers)])  # one scratch per step
    assert step.scratch is None


def test_bad_factors_option():
    with pytest.raises(KVQError, match="factors='sometimes'"):
        KVQCache("nsep>pchan>int4", tiny_model("llama").config, factors="sometimes")


def _calibrated_specs(tmp_path, dim: int) -> list[str]:
    from fitted import kvquant_specs, tc_spec, write_nuq, write_tc

    out = []
    for bits in (2, 3, 4, 8):
        f = write_tc(tmp_path / f"tc{bits}.safetensors", 1, 3, dim, bits, seed=dim + bits)
        out.append(tc_spec(f, 0, "k", bits, nsep=bits != 8))
    n = write_nuq(tmp_path / "nuq.safetensors", 1, 3, dim, 3, seed=dim)
    ref = f"source={f}#L0.v"
    return [*out, *kvquant_specs(n, 0, 3), "sparse(0.02,block,fp32)>pchan>int4(asym)",
            f"nsep>klt({ref})>pchan>int4", f"rot>nsep>klt({ref})>alloc(8,{ref})",
            f"klt({ref})>rot>ptok>int2(asym)", "rot(ggml)>ptok>int4",
            "rot(ggml,block=64)>nsep>pchan>int3"]


@pytest.mark.parametrize("dim,dtype", [(64, torch.float32), (80, torch.float32),
                                       (96, torch.float32), (128, torch.float32),
                                       (256, torch.float32), (64, torch.float16),
                                       (128, torch.bfloat16)])
def test_calibrated_reads_equal_pipeline_dequantize(dim, dtype, tmp_path):
    """klt (basis and mean folded), alloc (the variable-width stream, widths 0 to 8), nuq
    (static and min-max) and sparse: factor * d @ M equals Pipeline.dequantize, every block of
    a segment of two 16-token blocks and a 12-token one, the nsep factor stored or recomputed."""
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    g = torch.Generator().manual_seed(dim)
    x = (torch.randn(1, 3, 32 + 12, dim, generator=g) * 3).to(dtype)
    for spec in _calibrated_specs(tmp_path, dim):
        pipe = kvq.build(spec)
        reader = StreamReader(pipe)
        m = reader.matrix(dim, "cpu")
        for derive in (None, reader.factors) if reader.renorm else (None,):
            store = BlockStore(pipe)
            store.append(x[:, :, :32], 16, derive=derive)
            store.append(x[:, :, 32:], 12, derive=derive)
            ref = torch.cat(store.dequantize(), dim=-2).float()
            parts = []
            for seg in store.segments:
                d, f = reader.chunk(seg, 0, seg.n, Scratch(), "kv")
                y = d if f is None else d * f.unsqueeze(-1)
                parts.append(y if m is None else y @ m)
            got = torch.cat(parts, dim=-2)
            scale = ref.abs().max()
            torch.testing.assert_close(got / scale, ref / scale, atol=tol, rtol=0,
                                       msg=lambda e, s=spec: f"{s}: {e}")
