"""Relative error of a layer's attention output when its K and/or V are quantized.

K/V go through a :class:`kvq.hf.layer.KVQLayer` exactly as :class:`kvq.hf.KVQCache` stores them
in the teacher-forced protocol (``prefill="quantized"``: blocks of ``block`` tokens, statistics
per block, bit-packed, dequantized for attention). With the layer's real queries ``q`` (batch,
heads, n, head_dim) at their positions, causal (and sliding-window) masking and the model's
softmax scale:

    O = softmax(q Kᵀ · scale + mask) V        (exact)
    Ô = the same with K̂ and/or V̂

and the error of KV head ``h`` is ``‖Ô − O‖² / ‖O‖²`` over the query heads sharing it (GQA), all
sampled positions and the batch. Errors are returned as those two sums so that windows, heads
and layers can be pooled; :func:`relative` takes the square root.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvq.pipeline import Pipeline

IDENTITY = Pipeline.parse("none")


@dataclass
class Errors:
    """Squared error sums per KV head: ``num[h] = ‖Ô − O‖²``, ``den[h] = ‖O‖²``."""

    num: list[float]
    den: list[float]

    @property
    def heads(self) -> list[float]:
        """Relative error ‖Ô − O‖ / ‖O‖ per KV head."""
        return [relative(n, d) for n, d in zip(self.num, self.den)]

    @property
    def layer(self) -> float:
        """Relative error over all heads of the layer."""
        return relative(sum(self.num), sum(self.den))

    @property
    def energy(self) -> float:
        """‖Ô − O‖² / ‖O‖² over the layer (what adds up across layers and K/V)."""
        return sum(self.num) / max(sum(self.den), 1e-30)


@dataclass
class LayerErrors:
    """Errors of one layer: keys quantized alone, values alone, and both (per preset)."""

    keys: dict[str, Errors] = field(default_factory=dict)
    values: dict[str, Errors] = field(default_factory=dict)
    joint: dict[str, Errors] = field(default_factory=dict)


def relative(num: float, den: float) -> float:
    return (num / den) ** 0.5 if den > 0 else 0.0


def stored(x: torch.Tensor, pipeline: Pipeline, block: int, role: str) -> torch.Tensor:
    """(batch, kv_heads, seq, head_dim) -> what attention reads back from a quantized-prefill
    cache layer holding ``x`` as ``role`` ("keys" or "values")."""
    from kvq.hf.layer import KVQLayer

    if pipeline.is_identity:
        return x
    pair = (pipeline, IDENTITY) if role == "keys" else (IDENTITY, pipeline)
    layer = KVQLayer(*pair, prefill="quantized", block=block, residual=0, backend="torch")
    k, v = layer.update(x, x)
    return k if role == "keys" else v


class LayerAttention:
    """Exact attention of one layer, reusable against many quantized K/V."""

    def __init__(self, q, k, v, positions, scaling: float, sliding_window: int | None = None):
        b, hq, n, d = q.shape
        self.hkv = k.shape[1]
        self.groups = hq // self.hkv
        self.q = q.reshape(b, self.hkv, self.groups * n, d)  # query heads of one KV head together
        self.k, self.v, self.scaling = k, v, scaling
        pos = positions.to(k.device).repeat(self.groups)[:, None]
        keys = torch.arange(k.shape[2], device=k.device)[None, :]
        allowed = keys <= pos
        if sliding_window:
            allowed &= keys > pos - sliding_window
        self.mask = torch.zeros(allowed.shape, device=k.device).masked_fill(~allowed, -torch.inf)
        self.p = self.probs(k)
        self.out = self.p @ v

    def probs(self, k: torch.Tensor) -> torch.Tensor:
        """(batch, kv_heads, groups*n, seq) attention probabilities with keys ``k``."""
        return torch.softmax(self.q @ k.transpose(-1, -2) * self.scaling + self.mask, dim=-1)

    def errors(self, out: torch.Tensor) -> Errors:
        """Error sums of ``out`` (batch, kv_heads, groups*n, head_dim) against the exact output."""
        num = (out - self.out).pow(2).sum(dim=(0, 2, 3))
        den = self.out.pow(2).sum(dim=(0, 2, 3))
        return Errors(num.tolist(), den.tolist())


def stored_layers(xs: list[torch.Tensor], pipeline: Pipeline, block: int,
                  role: str) -> list[torch.Tensor]:
    """:func:`stored` for every layer at once: heads of all layers are stacked into one call
    (statistics are per head and block, so this changes nothing but the overhead)."""
    if pipeline.is_identity:
        return xs
    out = stored(torch.cat(xs, dim=1), pipeline, block, role)
    return list(out.split([x.shape[1] for x in xs], dim=1))


def all_errors(atts: list[LayerAttention], keys: dict[str, Pipeline],
               values: dict[str, Pipeline], presets: dict[str, tuple[str, str]], block: int,
               tick=lambda: None) -> list[LayerErrors]:
    """Per layer: errors for every key pipeline (V exact), value pipeline (K exact) and preset
    (both). ``keys``/``values``: spec -> pipeline; ``presets``: name -> (key spec, value spec),
    both among ``keys``/``values``. ``tick()`` is called once per pipeline and layer."""
    out = [LayerErrors() for _ in atts]
    v_hat: dict[str, list[torch.Tensor]] = {}
    for spec, p in values.items():
        v_hat[spec] = stored_layers([a.v for a in atts], p, block, "values")
        for a, e, v in zip(atts, out, v_hat[spec]):
            e.values[spec] = a.errors(a.p @ v)
            tick()
    for spec, p in keys.items():
        k_hat = stored_layers([a.k for a in atts], p, block, "keys")
        for i, (a, e, k) in enumerate(zip(atts, out, k_hat)):
            p_hat = a.probs(k) if k is not a.k else a.p
            e.keys[spec] = a.errors(p_hat @ a.v)
            for name, (ks, vs) in presets.items():
                if ks == spec:
                    e.joint[name] = a.errors(p_hat @ v_hat[vs][i])
            tick()
    return out
