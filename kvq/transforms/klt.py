"""Calibrated Karhunen-Loeve transform: a PCA basis per KV head, the transform of transform coding.

Keys (before RoPE) and values are far from isotropic: on SmolLM2-135M a few directions of a
head's unit keys carry most of their energy. Transform coding ("KV Cache Transform Coding", KVTC,
2025; "SVDq", 2025) rotates each vector into the eigenbasis of its head's covariance,
fitted offline, so that a quantizer can spend its bits where the variance is (``alloc``).
Nothing is stored per token: the mean and basis are per (layer, K/V, kv head) in the file.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from kvq.calibrated import Calibrated, check
from kvq.transforms.base import Transform


class KLT(Calibrated, Transform):
    """x -> (x - mean_h) @ U_h; inverse y @ U_h.T + mean_h.

    ``source=FILE#NAME`` names ``NAME.klt.mean`` (kv_heads, head_dim) and ``NAME.klt.basis``
    (kv_heads, head_dim, head_dim), orthonormal columns sorted by decreasing variance, written by
    ``kvq calibrate`` (see :mod:`kvq.transform_coding`). Inputs (batch, kv_heads * n, seq,
    head_dim), n cache blocks folded head-major. Put ``nsep`` first so that zero vectors stay
    exactly zero (their norm is 0).
    """

    type: Literal["klt"] = "klt"
    source: str | None = None
    sha256: str | None = None

    positional = ()
    calibrated_by: ClassVar[str] = "kvq calibrate --recipe tc3"

    def fitted_heads(self) -> int:
        return self.shared("klt.mean").shape[0]

    def load_tensors(self):
        mean, basis = self.shared("klt.mean"), self.shared("klt.basis")
        check(mean.dim() == 2 and basis.shape == (*mean.shape, mean.shape[1]), self,
              "klt.mean / klt.basis are not (kv_heads, head_dim) / (kv_heads, head_dim, head_dim)")
        eye = torch.eye(mean.shape[1]).expand_as(basis)
        check(bool(torch.isfinite(mean).all()) and bool(torch.isfinite(basis).all())
              and bool(((basis.transpose(1, 2) @ basis) - eye).abs().max() < 1e-3), self,
              "klt.basis is not finite and orthonormal")

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, basis = self.shared("klt.mean", x.device), self.shared("klt.basis", x.device)
        if x.shape[-1] != mean.shape[1]:
            from kvq.errors import KVQError

            raise KVQError(f"klt in {self.where} was fitted for head_dim {mean.shape[1]}, the "
                           f"K/V have head_dim {x.shape[-1]}; use the file calibrated for this "
                           "model")
        return self.per_head(mean, x.shape[1])[None, :, None], self.per_head(basis, x.shape[1])

    def forward(self, x):
        mean, basis = self._params(x)
        return torch.matmul(x.sub_(mean), basis), {}

    def inverse(self, x, meta):
        mean, basis = self._params(x)
        return torch.matmul(x, basis.transpose(1, 2)).add_(mean)
