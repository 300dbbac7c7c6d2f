"""Offline fitting of transform coding: a KLT basis per KV head and a bit allocation per channel.

A *recipe* is a pipeline spec ending in ``klt>alloc(b)`` without sources, e.g.
``nsep>klt>alloc(3)``. For one layer and K or V, :class:`TransformFit` takes captured K/V, runs
the recipe's steps before ``klt`` (``nsep``: unit directions), and per kv head fits

1. the mean and the eigenbasis of the covariance (PCA), columns sorted by decreasing variance;
2. the widths: greedy reverse water-filling, one bit at a time to the channel whose distortion
   drops most, ``var_c * (g(w) - g(w + 1))`` with ``g`` the mean squared error of the Lloyd-Max
   quantizer of a unit Gaussian at w bits (w = 0: the variance itself), until the head spends
   exactly ``b * head_dim`` bits (at most 8 per channel);
3. the levels of each channel: ``2**w`` levels by 1-D k-means of that coordinate over the
   calibration samples (``levels="kmeans"``), or the Gaussian Lloyd-Max levels scaled by the
   coordinate's standard deviation (``levels="gaussian"``).

Core module: it knows no model; :mod:`kvq.eval.calibrate` feeds it.
"""

from __future__ import annotations

import functools
import math
import re

import torch

from kvq.errors import SpecError
from kvq.quantizers.alloc import MAX_WIDTH
from kvq.spec import parse
from kvq.spec.build import make_step

_TAIL = re.compile(r"\bklt>alloc\((\d)\)\s*$")


def is_recipe(recipe: str) -> bool:
    """True for a spec ending in ``klt>alloc(b)`` (a transform-coding recipe)."""
    return _TAIL.search(recipe) is not None


def recipe_bits(recipe: str) -> int:
    m = _TAIL.search(recipe)
    if m is None or recipe.count("klt") != 1 or recipe.count("alloc(") != 1:
        raise SpecError(f"recipe {recipe[:200]!r} must end with one klt>alloc(b) without "
                        "sources", suggestion="e.g. 'nsep>klt>alloc(3)'")
    return int(m.group(1))


def at_bits(recipe: str, bits: int) -> str:
    """The recipe with ``alloc(b)`` set to ``alloc(bits)``."""
    return _TAIL.sub(f"klt>alloc({bits})", recipe)


def with_source(recipe: str, source: str, sha256: str | None = None) -> str:
    """``...>klt>alloc(b)`` -> ``...>klt(source=S)>alloc(b,source=S)`` (and ``sha256=`` the
    file's digest on both, when given)."""
    src = f"source={source}" + (f",sha256={sha256}" if sha256 else "")
    return _TAIL.sub(lambda m: f"klt({src})>alloc({m.group(1)},{src})", recipe)


@functools.cache
def gaussian_lloyd_max(bits: int, tol: float = 1e-7, max_iter: int = 100_000
                       ) -> tuple[torch.Tensor, float]:
    """(levels (2**bits,) fp32, mean squared error) of the Lloyd-Max quantizer of N(0, 1).

    Lloyd's iteration in closed form (Max, 1960): boundaries at midpoints, each level the mean of
    N(0, 1) on its cell, ``(pdf(a) - pdf(b)) / (cdf(b) - cdf(a))``, starting from the levels of
    the asymptotically optimal compander pdf^(1/3) (Panter-Dite), until no level moves by more
    than ``tol`` (fp32 levels need no more).
    """
    if bits == 0:
        return torch.zeros(1), 1.0
    n = 2**bits
    pdf = lambda t: torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731
    inf = torch.tensor([float("inf")], dtype=torch.float64)
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    c = math.sqrt(6) * torch.special.erfinv(2 * p - 1)  # quantiles of pdf^(1/3) = N(0, 3)
    for _ in range(max_iter):
        edges = torch.cat([-inf, (c[1:] + c[:-1]) / 2, inf])
        a, b = edges[:-1], edges[1:]
        mass = torch.special.ndtr(b) - torch.special.ndtr(a)
        new = (pdf(a) - pdf(b)) / mass
        new = (new - new.flip(0)) / 2  # symmetric density: symmetric levels
        moved = float((new - c).abs().max())
        c = new
        if moved < tol:
            break
    edges = torch.cat([-inf, (c[1:] + c[:-1]) / 2, inf])
    a, b = edges[:-1], edges[1:]
    mass = torch.special.ndtr(b) - torch.special.ndtr(a)
    xpdf = lambda t: torch.where(t.isinf(), torch.zeros_like(t), t * pdf(t))  # noqa: E731
    second = mass + xpdf(a) - xpdf(b)  # integral of x^2 pdf over the cell
    first = pdf(a) - pdf(b)
    mse = float((second - 2 * c * first + c * c * mass).sum())
    return c.float(), mse


def gaussian_mse(max_width: int = MAX_WIDTH) -> torch.Tensor:
    """g(w) for w = 0..max_width: (max_width + 1,) float64, see :func:`gaussian_lloyd_max`."""
    return torch.tensor([gaussian_lloyd_max(w)[1] for w in range(max_width + 1)],
                        dtype=torch.float64)


def allocate(variances: torch.Tensor, bits: int, max_width: int = MAX_WIDTH) -> torch.Tensor:
    """Widths (H, D) int64 for per-channel ``variances`` (H, D): each row sums to bits * D."""
    h, d = variances.shape
    if bits > max_width:
        raise SpecError(f"{bits} bits per element exceed the {max_width}-bit channel maximum")
    g = gaussian_mse(max_width)
    # distortion drop of the (w + 1)-th bit, per unit variance (none past max_width)
    gain = torch.cat([g[:-1] - g[1:], g.new_zeros(1)])
    var = variances.double().clamp_min(0)
    widths = torch.zeros(h, d, dtype=torch.long)
    rows = torch.arange(h)
    for _ in range(bits * d):
        drop = var * gain[widths]
        drop[widths >= max_width] = -1
        widths[rows, drop.argmax(dim=1)] += 1
    return widths


class TransformFit:
    """Collects one layer's keys or values and fits ``klt`` + ``alloc`` (module docstring).

    Args:
        recipe: the spec; its steps before ``klt`` run as in the pipeline.
        levels: ``"kmeans"`` or ``"gaussian"``.
        max_tokens: token vectors kept per head for the basis (uniformly subsampled, seeded).
        kmeans_tokens: of those, the samples each coordinate's k-means sees.
    """

    static = False

    def __init__(self, recipe: str, levels: str = "kmeans", max_tokens: int = 60_000,
                 kmeans_tokens: int = 16_384, seed: int = 0):
        self.bits = recipe_bits(recipe)
        if levels not in ("kmeans", "gaussian"):
            raise SpecError(f"levels={levels!r}: use 'kmeans' or 'gaussian' for klt>alloc")
        self.levels = levels
        parsed = parse(recipe)
        self.transforms = [make_step(p, i) for i, p in enumerate(parsed[:-2])]
        if any(s.role != "transform" for s in self.transforms):
            raise SpecError(f"recipe {recipe[:200]!r}: only transforms may come before klt")
        self.max_tokens, self.gen = max_tokens, torch.Generator().manual_seed(seed)
        self.kmeans_tokens = kmeans_tokens
        self.rows: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self.weight_count = 0
        self._pca = None

    def add(self, x: torch.Tensor, sensitivity: torch.Tensor | None = None,
            block: int | None = None) -> None:
        """x: (batch, kv_heads, seq, head_dim) K or V of one layer (sink tokens left out);
        ``sensitivity``: the same shape (squared loss gradients) or None (all ones). ``block`` is
        unused: the fit is per token.

        Channel c of the basis gets the weight ``sum_i U[i, c]^2 E[s_i n^2]`` (n: the token's
        norm when a transform before ``klt`` stores one, as ``nsep`` does: an error in the unit
        direction costs n times more in the K/V), and the allocation spends bits on
        ``weight * variance``: the expected squared error in K/V units, weighted by the
        diagonal Fisher information when a sensitivity is given (as KVQuant weights k-means)."""
        h = x.detach().to(torch.float32, copy=True)
        scale = torch.ones_like(h[..., :1])
        for t in self.transforms:
            h, meta = t.forward(h)
            if "norm" in meta:
                scale = scale * meta["norm"].float()
        self.rows.append(h.transpose(0, 1).flatten(1, 2))  # (H, B*T, D)
        s = torch.ones_like(h) if sensitivity is None else sensitivity.detach().float()
        self.weights.append((s * scale.pow(2)).sum(dim=(0, 2)))  # (H, D)
        self.weight_count += x.shape[0] * x.shape[2]
        self._pca = None

    @property
    def meta_bits_per_element(self) -> float:
        """What the transforms before ``klt`` store per element (nsep: 16 / head_dim)."""
        d = self.rows[0].shape[-1]
        return sum(t.meta_bits(1, d) for t in self.transforms) / d

    def pca(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean (H, D), basis (H, D, D), coefficients (H, N, D), importance (H, D)), cached."""
        if self._pca is not None:
            return self._pca
        if not self.rows:
            raise SpecError("no calibration samples were collected")
        x = torch.cat(self.rows, 1).double()
        if x.shape[1] > self.max_tokens:
            x = x[:, torch.randperm(x.shape[1], generator=self.gen)[: self.max_tokens]]
        heads, n, d = x.shape
        if n < 4 * d:
            raise SpecError(f"{n} calibration tokens are too few to fit a {d}x{d} basis; "
                            f"give at least {4 * d}")
        mean = x.mean(dim=1)
        xc = x - mean[:, None]
        basis = torch.linalg.eigh(xc.transpose(1, 2) @ xc / n)[1].flip(-1)
        y = xc @ basis  # (H, N, D)
        per_channel = torch.stack(self.weights).sum(0).double() / self.weight_count  # E[s n^2]
        importance = y.var(dim=1) * (basis.pow(2) * per_channel[:, :, None]).sum(dim=1)
        self._pca = mean, basis, y, importance
        return self._pca

    def distortion(self, bits: int) -> float:
        """Predicted weighted squared error per token at ``bits`` (Gaussian Lloyd-Max model):
        ``sum_h sum_c importance[h, c] * g(w[h, c])``; comparable across layers and K/V."""
        importance = self.pca()[3]
        return float((importance * gaussian_mse()[allocate(importance, bits)]).sum())

    def fit(self, bits: int | None = None) -> dict[str, torch.Tensor]:
        """``{"klt.mean", "klt.basis", "alloc.widths", "alloc.levels"}`` (fp32) at ``bits``
        (default: the recipe's)."""
        mean, basis, y, importance = self.pca()
        heads, n, d = y.shape
        widths = allocate(importance, bits or self.bits)
        n_max = 2 ** int(widths.max())
        rows = y.transpose(1, 2).reshape(heads * d, n)  # one row per (head, channel)
        if n > self.kmeans_tokens:  # k-means needs fewer samples than the basis
            rows = rows[:, torch.randperm(n, generator=self.gen)[: self.kmeans_tokens]]
        flat_w = widths.reshape(-1)
        levels = torch.zeros(heads * d, n_max)
        for w in flat_w.unique().tolist():
            sel = flat_w == w
            lv = self._levels(rows[sel], w)
            levels[sel] = torch.cat([lv, lv[:, -1:].expand(-1, n_max - lv.shape[1])], 1)
        return {"klt.mean": mean.float(), "klt.basis": basis.float(),
                "alloc.widths": widths.float(), "alloc.levels": levels.reshape(heads, d, n_max)}

    def _levels(self, v: torch.Tensor, w: int) -> torch.Tensor:
        """(C, 2**w) sorted levels for the C rows of samples ``v`` (C, N)."""
        if w == 0:
            return v.mean(dim=1, keepdim=True).float()
        if self.levels == "gaussian":
            lv = gaussian_lloyd_max(w)[0].double()
            return (lv * v.std(dim=1, keepdim=True) + v.mean(dim=1, keepdim=True)).float()
        return kmeans_rows(v, 2**w)


def kmeans_rows(v: torch.Tensor, k: int, iters: int = 50) -> torch.Tensor:
    """Lloyd's 1-D k-means on each row of ``v`` (C, N) at once -> (C, k) strictly increasing fp32.

    Initialised at the (i + 1/2) / k quantiles of each row; an empty cluster keeps its level.
    A sample on a midpoint joins the upper cell. Each row is sorted once, so an iteration costs
    k binary searches and prefix-sum lookups per row, not a pass over the samples.
    """
    vs = v.double().sort(dim=1).values
    c_rows, n = vs.shape
    zero = torch.zeros(c_rows, 1, dtype=torch.float64)
    prefix = torch.cat([zero, vs.cumsum(dim=1)], 1)  # (C, N + 1)
    ranks = ((torch.arange(k, dtype=torch.float64) + 0.5) / k * n).long().clamp_max(n - 1)
    c = vs[:, ranks]
    tol = 1e-9 * (vs.abs().amax(dim=1, keepdim=True) + 1e-30)
    ends = torch.full((c_rows, 1), n, dtype=torch.long)
    for _ in range(iters):
        # cell j holds the samples in [mid_{j-1}, mid_j): its end is #samples < mid_j
        pos = torch.searchsorted(vs, ((c[:, 1:] + c[:, :-1]) / 2).contiguous())
        pos = torch.cat([torch.zeros_like(ends), pos, ends], 1)  # (C, k + 1)
        mass = (pos[:, 1:] - pos[:, :-1]).double()
        total = prefix.gather(1, pos[:, 1:]) - prefix.gather(1, pos[:, :-1])
        new = torch.where(mass > 0, total / mass.clamp_min(1), c).sort(dim=1).values
        done = bool(((new - c).abs() <= tol).all())
        c = new
        if done:
            break
    c = c.float()
    for i in range(1, k):  # distinct levels (a codebook needs them strictly increasing)
        c[:, i] = torch.maximum(c[:, i], torch.nextafter(c[:, i - 1], torch.tensor(float("inf"))))
    return c


def coding_gain_db(variances: torch.Tensor) -> float:
    """Arithmetic over geometric mean of per-channel variances, in dB (high-rate gain)."""
    v = variances.double().clamp_min(1e-30)
    return 10 * math.log10(float(v.mean() / v.log().mean().exp()))
