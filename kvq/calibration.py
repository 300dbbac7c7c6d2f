"""Offline fitting of ``nuq`` codebooks: recipes, normalized samples, weighted 1-D k-means.

A *recipe* is a pipeline spec whose quantizer is ``nuq(b)`` without a codebook, e.g.
``sparse(0.01,channel)>pchan>nuq(3)``. For each layer and K/V, :class:`LevelFit` takes captured
K/V blocks (and optionally a sensitivity per entry), runs the recipe's transforms, normalizes
each granularity group to [-1, 1] exactly as :class:`~kvq.quantizers.nuq.Nuq` will, and fits
``2**b`` levels by k-means on those values (KVQuant's ``SimQuant.quantize``, which uses
``sklearn.cluster.KMeans`` with Fisher-information sample weights). Core module: it knows no
model; :mod:`kvq.eval.calibrate` feeds it.
"""

from __future__ import annotations

import re

import torch

from kvq.errors import SpecError
from kvq.spec import parse
from kvq.spec.build import make_step

_NUQ = re.compile(r"\bnuq\((\d)((?:,[^()]*)?)\)\s*$")


def recipe_bits(recipe: str) -> int:
    """The bit width of the ``nuq(b)`` (or ``nuq(b,scale=static)``) a recipe spec ends with."""
    m = _NUQ.search(recipe)
    if m is None or recipe.count("nuq(") != 1 or "source" in m.group(2):
        raise SpecError(f"recipe {recipe[:200]!r} must end with one nuq(b) without a codebook",
                        suggestion="e.g. 'sparse(0.01,channel)>pchan>nuq(3)'")
    return int(m.group(1))


def with_source(recipe: str, source: str, sha256: str | None = None) -> str:
    """The recipe with its ``nuq(b...)`` given a codebook: ``nuq(b...,source=FILE#NAME)``
    (and ``sha256=`` the file's digest, when given)."""
    pin = f",sha256={sha256}" if sha256 else ""
    return _NUQ.sub(lambda m: f"nuq({m.group(1)}{m.group(2)},source={source}{pin})", recipe)


class LevelFit:
    """Collects normalized samples of one layer's keys or values and fits their levels.

    Args:
        recipe: the spec (see the module docstring); its steps before ``nuq`` run as in the
            pipeline, so ``sparse`` outliers are removed before the range is taken.
        max_samples: samples kept (uniformly subsampled per block, seeded).
        levels: ``"kmeans"``, or ``"uniform"`` (2**b evenly spaced levels in [-1, 1], no fit:
            the ablation that keeps everything of the recipe but the non-uniform levels).
    """

    def __init__(self, recipe: str, max_samples: int = 150_000, seed: int = 0,
                 levels: str = "kmeans"):
        self.bits = recipe_bits(recipe)
        if levels not in ("kmeans", "uniform"):
            raise SpecError(f"levels={levels!r}: use 'kmeans' or 'uniform'")
        self.levels = levels
        parsed = parse(recipe)
        self.static = parsed[-1].kwargs.get("scale") == "static"
        self.zero = self.scale = None
        steps = [make_step(p, i) for i, p in enumerate(parsed[:-1])]
        self.transforms = [s for s in steps if s.role == "transform"]
        grans = [s for s in steps if s.role == "granularity"]
        from kvq.granularity import PerToken

        self.granularity = grans[0] if grans else PerToken()
        self.max_samples, self.gen = max_samples, torch.Generator().manual_seed(seed)
        self.values: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, sensitivity: torch.Tensor | None = None,
            block: int | None = None, per_call: int = 50_000) -> None:
        """x: (batch, kv_heads, seq, head_dim) K or V of one layer; sensitivity: same shape
        (e.g. squared loss gradients) or None. With ``block``, statistics are taken per block
        of ``block`` tokens, as :class:`kvq.hf.KVQCache` quantizes (a shorter tail is left out).
        """
        from kvq.quantizers.nuq import minmax_normalize

        heads = x.shape[1]
        if block is not None:
            x = fold_blocks(x, block)
            sensitivity = None if sensitivity is None else fold_blocks(sensitivity, block)
        h = x.detach().to(torch.float32, copy=True)
        for t in self.transforms:
            h, _ = t.forward(h)
        if self.static:  # per (head, channel) statistics over every calibration token: keep all
            unfold = lambda t: t.reshape(t.shape[0], heads, -1, t.shape[-1])  # noqa: E731
            self.values.append(unfold(h))
            self.weights.append(unfold(torch.ones_like(h) if sensitivity is None
                                       else sensitivity.detach().float()))
            return
        g = self.granularity
        v, scale, _ = minmax_normalize(h, g)
        # weight the error in K/V units: sensitivity * (scale * dv)^2
        w = torch.ones_like(v) if sensitivity is None else \
            g.view(sensitivity.detach().float()) * g.from_meta(scale.float()).pow(2)
        v, w = v.flatten(), w.flatten()
        keep = torch.randperm(v.numel(), generator=self.gen)[:per_call]
        self.values.append(v[keep])
        self.weights.append(w[keep])

    def fit(self, iters: int = 40) -> torch.Tensor:
        """Sorted fp32 levels (2**bits,) in [-1, 1]."""
        if not self.values:
            raise SpecError("no calibration samples were collected")
        if self.static:
            v, w = self._static_normalize()
        else:
            v, w = torch.cat(self.values), torch.cat(self.weights)
        if self.levels == "uniform":
            return torch.linspace(-1, 1, 2**self.bits)
        if v.numel() > self.max_samples:
            keep = torch.randperm(v.numel(), generator=self.gen)[: self.max_samples]
            v, w = v[keep], w[keep]
        # min-max normalization maps each group's min and max onto -1 and +1: keep levels there
        # (as a uniform grid does), so the largest entries of every group stay exact
        return weighted_kmeans_1d(v, w, 2**self.bits, iters,
                                  ends=None if self.static else (-1.0, 1.0))


    def _static_normalize(self, clip: float = 0.001) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit per-(head, channel) zero/scale on the [clip, 1 - clip] quantiles of every
        calibration token; return the normalized values and their weights (flattened)."""
        x = torch.cat([t.transpose(0, 1).flatten(1, 2) for t in self.values], 1)  # (H, N, D)
        w = torch.cat([t.transpose(0, 1).flatten(1, 2) for t in self.weights], 1)
        q = torch.tensor([clip, 1 - clip])
        lo, hi = torch.quantile(x.transpose(1, 2), q, dim=-1)  # each (H, D)
        scale = ((hi - lo) / 2).clamp_min(1e-6 * float((hi - lo).abs().max().clamp_min(1e-30)))
        self.zero, self.scale = (hi + lo) / 2, scale
        v = (x - self.zero[:, None]) / scale[:, None]
        w = w * scale[:, None].pow(2)
        keep = torch.randperm(v.numel(), generator=self.gen)[: self.max_samples]
        return v.flatten()[keep], w.flatten()[keep]


def fold_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H * (T // block), block, D): whole blocks only, head-major."""
    b, h, t, d = x.shape
    n = t // block
    if n == 0:
        raise SpecError(f"calibration windows of {t} tokens hold no block of {block} tokens")
    return x[:, :, : n * block].reshape(b, h * n, block, d)


def weighted_kmeans_1d(v: torch.Tensor, w: torch.Tensor, k: int, iters: int = 60,
                       ends: tuple[float, float] | None = None) -> torch.Tensor:
    """Lloyd's k-means on scalars ``v`` (N,) with weights ``w`` (N,) >= 0 -> sorted (k,) fp32.

    Initialised at weighted quantiles; an empty cluster keeps its level; levels are made
    strictly increasing (a codebook needs distinct levels). ``ends``: the first and last level
    are pinned there and only the others move.
    """
    v, w = v.double(), w.double().clamp_min(0)
    if not bool(w.sum() > 0):
        w = torch.ones_like(v)
    order = v.argsort()
    vs, cw = v[order], w[order].cumsum(0)
    targets = (torch.arange(k, dtype=torch.float64) + 0.5) / k * cw[-1]
    c = vs[torch.searchsorted(cw, targets).clamp_max(v.numel() - 1)]
    if ends is not None:
        c[0], c[-1] = ends
    for _ in range(iters):
        c = c.sort().values
        idx = torch.bucketize(v, (c[1:] + c[:-1]) / 2, right=True)
        mass = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, w)
        total = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, w * v)
        new = torch.where(mass > 0, total / mass.clamp_min(1e-300), c)
        if ends is not None:
            new[0], new[-1] = ends
        if torch.allclose(new, c, rtol=0, atol=1e-7):
            c = new
            break
        c = new
    c = c.sort().values.float()
    for i in range(1, k):  # distinct levels
        if c[i] <= c[i - 1]:
            c[i] = torch.nextafter(c[i - 1], torch.tensor(float("inf")))
    return c
