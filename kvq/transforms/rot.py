"""Rotation of head_dim (QuaRot / QuIP# style incoherence processing).

An orthonormal rotation spreads outlier channels over all channels before quantization:
the normalised Sylvester Hadamard matrix when head_dim is a power of two, otherwise a seeded
random orthogonal matrix. Nothing is stored: the matrix is a function of (head_dim, seed).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import Field

from kvq.transforms.base import Transform


class Rotation(Transform):
    """x -> x @ R with R (head_dim, head_dim) orthonormal; inverse x @ R.T.

    ``kind="auto"`` uses Hadamard for power-of-two head_dim and a random orthogonal matrix
    (``seed``) otherwise; ``kind="random"`` always uses the random one. ``block=b`` rotates
    each run of b channels on its own (R block-diagonal).

    ``kind="ggml"`` is llama.cpp's KV-cache rotation rule at every head_dim (src/llama-kv-cache.cpp:
    ``attn_rot_k/v`` and ``build_input_k_rot/v_rot``): no rotation at all (R = I) unless
    head_dim % 64 == 0; then Hadamard blocks of ``block`` channels, by default the largest power
    of two >= 64 dividing head_dim (llama.cpp's K); llama.cpp's V uses ``block=64``.
    """

    type: Literal["rot"] = "rot"
    kind: Literal["auto", "hadamard", "random", "ggml"] = "auto"
    seed: int = 0
    block: int | None = Field(default=None, gt=0, description="channels per rotated block")

    positional = ("kind",)

    def matrix(self, head_dim: int, device=None) -> torch.Tensor:
        """R: (head_dim, head_dim) fp32."""
        if self.kind == "ggml":
            return ggml_matrix(head_dim, self.block).to(device)
        if self.block is None:
            return rotation_matrix(head_dim, self.kind, self.seed).to(device)
        if head_dim % self.block:
            from kvq.errors import KVQError

            raise KVQError(f"rot(block={self.block}) needs a head_dim that is a multiple of "
                           f"{self.block}, got {head_dim}; drop block= to rotate the whole head")
        r = rotation_matrix(self.block, self.kind, self.seed)
        return torch.block_diag(*[r] * (head_dim // self.block)).to(device)

    def forward(self, x):
        if self.kind == "ggml" and x.shape[-1] % GGML_MIN_BLOCK:
            return x.clone(), {}  # llama.cpp does not rotate: keep every bit (and -0.0)
        return x @ self.matrix(x.shape[-1], x.device), {}

    def inverse(self, x, meta):
        if self.kind == "ggml" and x.shape[-1] % GGML_MIN_BLOCK:
            return x.clone()
        return x @ self.matrix(x.shape[-1], x.device).T


GGML_MIN_BLOCK = 64


def ggml_block(head_dim: int) -> int | None:
    """llama.cpp's K rotation block: the largest power of two >= 64 dividing head_dim, or None
    (no rotation) when 64 does not divide head_dim."""
    if head_dim % GGML_MIN_BLOCK:
        return None
    block = GGML_MIN_BLOCK
    while head_dim % (2 * block) == 0:
        block *= 2
    return block


@functools.lru_cache(maxsize=32)
def ggml_matrix(head_dim: int, block: int | None = None) -> torch.Tensor:
    """llama.cpp's rotation of a head_dim-wide K (block None) or V (block 64) row: (D, D) fp32,
    the identity when 64 does not divide head_dim (see :class:`Rotation`)."""
    auto = ggml_block(head_dim)
    if auto is None:
        return torch.eye(head_dim)
    block = block or auto
    if head_dim % block or not is_power_of_two(block):
        from kvq.errors import KVQError

        raise KVQError(f"rot(ggml,block={block}) needs a power-of-two block dividing head_dim "
                       f"{head_dim}; drop block= for llama.cpp's K rule or use block=64 (its V)")
    h = rotation_matrix(block, "hadamard")
    return torch.block_diag(*[h] * (head_dim // block))


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@functools.lru_cache(maxsize=32)
def rotation_matrix(head_dim: int, kind: str = "auto", seed: int = 0) -> torch.Tensor:
    """Orthonormal (head_dim, head_dim) fp32 matrix; see :class:`Rotation`."""
    if kind == "hadamard" or (kind == "auto" and is_power_of_two(head_dim)):
        if not is_power_of_two(head_dim):
            from kvq.errors import KVQError

            raise KVQError(f"rot(hadamard) needs a power-of-two head_dim, got {head_dim}; "
                           "use 'rot' (auto) or 'rot(random)'")
        h = torch.ones(1, 1)
        while h.shape[0] < head_dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / head_dim**0.5
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.float()
