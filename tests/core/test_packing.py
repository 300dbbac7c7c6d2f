"""Bit-packing is exact for every width and follows the documented byte layout."""

import pytest
import torch

from kvq.quantizers.packing import pack, packed_row_bytes, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [1, 5, 8, 13, 64, 80, 96, 128, 256])
def test_pack_unpack_exact(bits, head_dim):
    g = torch.Generator().manual_seed(head_dim * bits)
    codes = torch.randint(0, 2**bits, (2, 3, 7, head_dim), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (2, 3, 7, packed_row_bytes(head_dim, bits))
    assert torch.equal(unpack(packed, bits, head_dim), codes)


def test_extreme_codes_round_trip():
    for bits in (2, 3, 4, 8):
        codes = torch.full((1, 1, 3, 16), 2**bits - 1, dtype=torch.uint8)
        codes[..., ::2] = 0
        assert torch.equal(unpack(pack(codes, bits), bits, 16), codes)


def test_layout_is_little_endian_bit_stream():
    c = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    assert pack(c, 4).tolist() == [[0x21, 0x43, 0x65, 0x07]]
    assert pack(c[:, :4] % 4, 2).tolist() == [[1 | 2 << 2 | 3 << 4 | 0 << 6, 0]]
    word = sum(int(v) << (3 * i) for i, v in enumerate(c[0]))
    assert pack(c, 3).tolist() == [[word & 0xFF, word >> 8 & 0xFF, word >> 16 & 0xFF]]
    assert torch.equal(pack(c, 8), c)


def test_int3_is_dense():
    assert packed_row_bytes(128, 3) == 48  # 3 bits/element, not padded to 4
    assert packed_row_bytes(80, 3) == 30


def test_unsupported_width():
    with pytest.raises(ValueError, match="5-bit"):
        pack(torch.zeros(1, 8, dtype=torch.uint8), 5)
