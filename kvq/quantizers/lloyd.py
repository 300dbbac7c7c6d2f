"""Lloyd-Max codebooks for rotated unit vectors (TurboQuant, Zandieh et al., ICLR 2026).

After ``nsep>rot`` each coordinate of a head_dim = d vector is a coordinate of a (nearly)
uniformly random unit vector, whose exact density is ``c_d (1 - x^2)^((d-3)/2)`` on [-1, 1]
(``dist="beta"``: x = 2B - 1 with B ~ Beta((d-1)/2, (d-1)/2)); for large d it tends to
N(0, 1/d) (``dist="gaussian"``). The Lloyd-Max quantizer of that density (levels = centroids of
their cells, cells split at midpoints) is the MSE-optimal scalar codebook; kvq solves it to
convergence on a fine grid (``beta`` and ``gaussian`` are kvq's own, exact-density codebooks).

``dist="vllm"`` is vLLM 0.33's codebook instead, bit for bit: ``turboquant/centroids.py``
``get_centroids(d, bits)`` fits N(0, 1/d) with 200-step trapezoid integrals per cell, 200
iterations from a uniform start on +-3.5 sigma. At d = 64..256 and 2..4 bits its levels are
5e-5 to 2e-4 (0.06-0.07% relative) from the converged Gaussian ones (the trapezoid's integration
error, not its iteration count) and 1.1e-4 to 1.1e-2 from ``beta`` (outer levels 0.6/1.8/3.1%
apart at d = 64, 2/3/4 bits).

Every codebook depends only on (bits, head_dim, dist): computed once, deterministically,
cached, never stored.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch

from kvq.quantizers.codebook import CodebookQuantizer

Dist = Literal["beta", "gaussian", "vllm"]
GRID = 2**16  # cells of the integration grid
MAX_ITER = 5000


class Lloyd(CodebookQuantizer):
    """Lloyd-Max codebook of 2**bits levels for one coordinate of a random unit vector.

    ``lloyd4(none)`` after ``nsep>rot`` is TurboQuant's MSE quantizer (no scale stored: bits per
    element = bits + the nsep norm), ``lloyd4(none,vllm)`` with vLLM's own codebook;
    ``lloyd4`` (absmax) rescales the codebook per granularity
    group and works anywhere. See :class:`~kvq.quantizers.codebook.CodebookQuantizer`.
    2, 3 or 4 bits (TurboQuant uses 2-4; at 8 bits Lloyd's iteration needs minutes to converge
    and int8 / fp8 are as good).
    """

    type: Literal["lloyd"] = "lloyd"
    bits: Literal[2, 3, 4]
    dist: Dist = "beta"

    positional = ("bits", "scale", "dist")

    def spec_name(self):
        return f"lloyd{self.bits}"

    def spec_fixed(self):
        return {"bits": self.bits}

    def codebook(self, head_dim):
        if self.dist == "vllm":
            return vllm_centroids(self.bits, head_dim)
        return lloyd_max(self.bits, head_dim, self.dist)


def density(dist: Dist, head_dim: int) -> tuple[float, float, Callable]:
    """(lo, hi, unnormalised pdf on float64 tensors) of one coordinate of a random unit vector."""
    d = head_dim
    if dist == "gaussian":
        span = 12 / math.sqrt(d)
        return -span, span, lambda x: torch.exp(-0.5 * d * x * x)
    if d < 3:
        raise ValueError(f"the beta density needs head_dim >= 3, got {d}")
    return -1.0, 1.0, lambda x: (1 - x * x).clamp_min(0) ** ((d - 3) / 2)


@functools.lru_cache(maxsize=64)
def lloyd_max(bits: int, head_dim: int, dist: Dist = "beta") -> torch.Tensor:
    """Sorted fp32 Lloyd-Max levels, shape (2**bits,), for ``density(dist, head_dim)``.

    The density is integrated with the midpoint rule on ``GRID`` cells (float64); cell masses
    and first moments at any boundary come from their cumulative sums by linear interpolation.
    Starts at the (i + 1/2) / n quantiles of pdf^(1/3) (the asymptotically optimal
    compander, Panter-Dite), iterates centroid <- E[x | cell], boundary <-
    midpoint, with the levels kept exactly symmetric, until no level moves by more than
    1e-12 of the spread (or MAX_ITER).
    """
    lo, hi, pdf = density(dist, head_dim)
    edges = torch.linspace(lo, hi, GRID + 1, dtype=torch.float64)
    mid = (edges[1:] + edges[:-1]) / 2
    mass = pdf(mid)
    mass = mass / mass.sum()
    cum_f = torch.cat([mass.new_zeros(1), mass.cumsum(0)])
    cum_m = torch.cat([mass.new_zeros(1), (mass * mid).cumsum(0)])
    n = 2**bits
    comp = mass ** (1 / 3)
    cum_c = torch.cat([comp.new_zeros(1), (comp / comp.sum()).cumsum(0)])
    levels = _interp(torch.arange(n, dtype=torch.float64).add_(0.5).div_(n), cum_c, edges)
    tol = 1e-12 * (hi - lo)
    for _ in range(MAX_ITER):
        bounds = torch.cat([edges[:1], (levels[1:] + levels[:-1]) / 2, edges[-1:]])
        f, m = _interp(bounds, edges, cum_f), _interp(bounds, edges, cum_m)
        new = (m[1:] - m[:-1]) / (f[1:] - f[:-1])
        new = (new - new.flip(0)) / 2  # the density is even: keep the levels symmetric
        moved = (new - levels).abs().max()
        levels = new
        if moved < tol:
            break
    return levels.float()


@functools.lru_cache(maxsize=64)
def vllm_centroids(bits: int, head_dim: int) -> torch.Tensor:
    """vLLM 0.33's TurboQuant levels, shape (2**bits,) fp32, equal to
    ``vllm/model_executor/layers/quantization/turboquant/centroids.py::get_centroids(d, bits)``.

    The same Python float arithmetic, operation for operation (so the same fp32 values): Lloyd's
    iteration for N(0, 1/d) from levels uniform on +-3.5 sigma, outer edges at +-10.5 sigma,
    each cell's mass and first moment by a 200-step trapezoid rule, at most 200 iterations or
    until no level moves by 1e-10.
    """
    n, sigma2 = 2**bits, 1.0 / head_dim
    sigma = math.sqrt(sigma2)

    def pdf(x):
        return (1.0 / math.sqrt(2 * math.pi * sigma2)) * math.exp(-x * x / (2 * sigma2))

    def trapz(f, a, b, steps=200):
        h = (b - a) / steps
        total = 0.5 * (f(a) + f(b))
        for i in range(1, steps):
            total += f(a + i * h)
        return total * h

    lo, hi = -3.5 * sigma, 3.5 * sigma
    levels = [lo + (hi - lo) * (i + 0.5) / n for i in range(n)]
    for _ in range(200):
        edges = [lo * 3] + [(levels[i] + levels[i + 1]) / 2.0 for i in range(n - 1)] + [hi * 3]
        new = []
        for i in range(n):
            a, b = edges[i], edges[i + 1]
            num = trapz(lambda x: x * pdf(x), a, b)
            den = trapz(pdf, a, b)
            new.append(num / den if den > 1e-15 else levels[i])
        if max(abs(new[i] - levels[i]) for i in range(n)) < 1e-10:
            break
        levels = new
    return torch.tensor(levels, dtype=torch.float32)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x (xp increasing, x within [xp0, xp-1])."""
    i = torch.searchsorted(xp, x).clamp_(1, len(xp) - 1)
    x0, x1 = xp[i - 1], xp[i]
    w = ((x - x0) / (x1 - x0)).clamp_(0, 1)
    return fp[i - 1] + w * (fp[i] - fp[i - 1])
