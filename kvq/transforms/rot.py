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
    each run of b channels on its own (R block-diagonal, as llama.cpp rotates V with b = 64).
    """

    type: Literal["rot"] = "rot"
    kind: Literal["auto", "hadamard", "random"] = "auto"
    seed: int = 0
    block: int | None = Field(default=None, gt=0, description="channels per rotated block")

    positional = ("kind",)

    def matrix(self, head_dim: int, device=None) -> torch.Tensor:
        """R: (head_dim, head_dim) fp32."""
        if self.block is None:
            return rotation_matrix(head_dim, self.kind, self.seed).to(device)
        if head_dim % self.block:
            from kvq.errors import KVQError

            raise KVQError(f"rot(block={self.block}) needs a head_dim that is a multiple of "
                           f"{self.block}, got {head_dim}; drop block= to rotate the whole head")
        r = rotation_matrix(self.block, self.kind, self.seed)
        return torch.block_diag(*[r] * (head_dim // self.block)).to(device)

    def forward(self, x):
        return x @ self.matrix(x.shape[-1], x.device), {}

    def inverse(self, x, meta):
        return x @ self.matrix(x.shape[-1], x.device).T


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
