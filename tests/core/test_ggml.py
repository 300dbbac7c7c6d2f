"""llama.cpp's q4_0 / q4_1 / q8_0: codes, scales and dequantized values equal gguf.quants'."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf import quants

import kvq
from kvq.errors import KVQError, NumericsError, SpecError
from kvq.quantizers import unpack
from kvq.testing import DTYPES, HEAD_DIMS, edge_blocks, kv_like

FORMATS = {"q4_0": GT.Q4_0, "q4_1": GT.Q4_1, "q8_0": GT.Q8_0}
BITS = {"q4_0": 4.5, "q4_1": 5.0, "q8_0": 8.5}


def reference(x: torch.Tensor, fmt: str):
    """gguf's own quantize -> (codes as kvq stores them, d, m or None, dequantized fp32)."""
    rows = x.float().reshape(-1, x.shape[-1]).numpy()
    raw = quants.quantize(rows, FORMATS[fmt])
    deq = quants.dequantize(raw, FORMATS[fmt])
    blocks = raw.reshape(-1, {"q4_0": 18, "q4_1": 20, "q8_0": 34}[fmt])
    d = blocks[:, :2].copy().view(np.float16)
    m = blocks[:, 2:4].copy().view(np.float16) if fmt == "q4_1" else None
    qs = blocks[:, 4 if fmt == "q4_1" else 2:]
    if fmt == "q8_0":
        codes = qs.view(np.int8).astype(np.int16) + 128  # kvq: int8 value + 128
    else:  # byte j holds element j (low nibble) and element j + 16 (high nibble)
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    shape = (*x.shape[:-1], x.shape[-1] // 32)
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).reshape(shape)  # noqa: E731
    return (torch.from_numpy(codes.astype(np.uint8)).reshape(x.shape), to(d),
            None if m is None else to(m), torch.from_numpy(deq).reshape(x.shape))


def assert_matches(x: torch.Tensor, fmt: str):
    p = kvq.build(fmt)
    q = p.quantize(x, backend="torch")
    codes, d, m, deq = reference(x, fmt)
    assert torch.equal(unpack(q.codes, p.bits, x.shape[-1]), codes), "codes differ from gguf"
    assert torch.equal(q.meta["scale"].view(torch.int16), d.view(torch.int16)), "scales differ"
    if m is not None:
        assert torch.equal(q.meta["zero"].view(torch.int16), m.view(torch.int16)), "mins differ"
    ours = p.quantizer.dequantize(unpack(q.codes, p.bits, x.shape[-1]), q.meta, p.granularity)
    assert torch.equal(ours, deq), "dequantized values differ from gguf"
    assert torch.equal(p.dequantize(q), deq.to(x.dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [d for d in HEAD_DIMS if d % 32 == 0])
@pytest.mark.parametrize("fmt", FORMATS)
def test_bit_exact_with_gguf(fmt, head_dim, dtype):
    assert_matches(kv_like(2, 3, 17, head_dim, dtype=dtype, seed=head_dim), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_edge_cases_bit_exact(fmt):
    assert_matches(edge_blocks(), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_zeros_stay_zero_and_bits_as_stored(fmt):
    p = kvq.build(fmt)
    zeros = torch.zeros(1, 2, 5, 64)
    assert torch.equal(p.roundtrip(zeros), zeros)
    q = p.quantize(kv_like(1, 2, 40, 128))
    assert q.nbytes * 8 / (2 * 40 * 128) == BITS[fmt] == p.bits_per_element(128, 40)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("fmt", FORMATS)
def test_non_finite_input_raises(fmt, bad):
    x = kv_like(1, 1, 4, 64)
    x[0, 0, 2, 5] = bad
    with pytest.raises(NumericsError, match="NaN or Inf"):
        kvq.build(fmt).quantize(x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp16_overflow_raises(fmt):
    x = torch.full((1, 1, 2, 32), 1e9, dtype=torch.bfloat16)
    x[..., 0] = -1e9  # the range overflows fp16 in every format (and q4_1's minimum too)
    with pytest.raises(NumericsError, match="overflows float16"):
        kvq.build(fmt).quantize(x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_float16_input_near_its_maximum_is_finite_or_raises(fmt):
    # q4_1 / q8_0 round their fp16 scale up past what float16 holds (gguf gives 65536 / 65532)
    x = torch.tensor([-65504.0] + [0.0] * 30 + [65504.0]).half().reshape(1, 1, 1, 32)
    if fmt == "q4_0":  # the first max maps to -8 d = -65504 exactly, the other to 7 d
        assert torch.equal(kvq.build(fmt).roundtrip(x), reference(x, fmt)[3].half())
        return
    assert reference(x, fmt)[3].abs().max() > 65504
    with pytest.raises(NumericsError, match="past its maximum"):
        kvq.build(fmt).quantize(x)


@pytest.mark.parametrize("head_dim", [d for d in HEAD_DIMS if d % 32] + [48])
def test_head_dim_not_multiple_of_32(head_dim):
    # llama.cpp refuses these too (a quantized cache needs head_dim % block size == 0)
    with pytest.raises(KVQError, match=f"blocks of 32 channels, but head_dim is {head_dim}"):
        kvq.build("q4_0").quantize(torch.randn(1, 1, 3, head_dim))


def test_spec_strings():
    assert kvq.build("rot>q4_0").to_spec() == "rot>q4_0"
    p = kvq.build("group(32)>q8_0")
    assert kvq.build(p.to_spec()) == p
    assert kvq.Pipeline.model_validate_json(p.model_dump_json()) == p
    with pytest.raises(SpecError, match="cannot use the granularity 'ptok'"):
        kvq.build("ptok>q4_1")
    with pytest.raises(SpecError, match="takes no arguments|at most 0"):
        kvq.build("q4_0(4)")


@pytest.mark.parametrize("fmt", FORMATS)
def test_plain_presets_are_the_format(fmt):
    """(The -rot presets are checked against llama.cpp's rule in tests/parity/test_llama_cpp.py.)"""
    assert kvq.kv(fmt).keys == kvq.build(fmt) and kvq.kv(fmt).values == kvq.build(fmt)
