"""Bit-packing of unsigned integer codes along the last dim.

Layout (shared by every backend): each row is padded with zero codes to a multiple of 8
elements; element j occupies bits [j*b, (j+1)*b) of a little-endian bit stream (byte k holds
bits 8k..8k+7, least significant first). So every 8 codes take exactly ``b`` bytes:
int4 packs 2 codes per byte, int2 4 per byte, int3 8 codes per 3 bytes, int8 1 per byte.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_row_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one packed row of ``head_dim`` codes."""
    return -(-head_dim // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 (..., D) with values < 2**bits -> uint8 (..., ceil(D/8) * bits)."""
    _check_bits(bits)
    codes = _pad8(codes)
    if bits == 8:
        return codes
    if bits in (2, 4):
        per = 8 // bits
        g = codes.view(*codes.shape[:-1], -1, per)
        out = g[..., 0].clone()
        for i in range(1, per):
            out |= g[..., i] << (bits * i)
        return out
    g = codes.view(*codes.shape[:-1], -1, 8).to(torch.int32)
    shifts = torch.arange(0, 8 * bits, bits, device=codes.device, dtype=torch.int32)
    word = (g << shifts).sum(dim=-1, keepdim=True, dtype=torch.int32)
    byte_shifts = torch.arange(0, 8 * bits // 8 * 8, 8, device=codes.device, dtype=torch.int32)
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).flatten(-2)


def unpack(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 (..., ceil(D/8) * bits) -> uint8 (..., head_dim)."""
    _check_bits(bits)
    if bits == 8:
        return packed[..., :head_dim]
    if bits in (2, 4):
        mask = (1 << bits) - 1
        parts = [packed & mask] + [(packed >> s) & mask for s in range(bits, 8, bits)]
        return torch.stack(parts, dim=-1).flatten(-2)[..., :head_dim]
    g = packed.view(*packed.shape[:-1], -1, bits).to(torch.int32)
    byte_shifts = torch.arange(0, 8 * bits, 8, device=packed.device, dtype=torch.int32)
    word = (g << byte_shifts).sum(dim=-1, keepdim=True, dtype=torch.int32)
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device, dtype=torch.int32)
    out = ((word >> shifts) & ((1 << bits) - 1)).to(torch.uint8)
    return out.flatten(-2)[..., :head_dim]


def _pad8(codes: torch.Tensor) -> torch.Tensor:
    pad = -codes.shape[-1] % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    return codes.contiguous()


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported: {SUPPORTED_BITS}")
