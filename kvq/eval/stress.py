"""Function-preserving outlier stress: give a model's keys Qwen2-7B-like outlier channels.

Attention scores are ``q·k`` per head. Scaling key channel ``c`` by ``s`` and the matching query
channel by ``1/s`` leaves every ``q·k`` unchanged. Both are linear in the weights, so this is done
on the rows of the query and key projections (and their biases)::

    k_c = W_k[c]·x + b_k[c]  ->  s·k_c          q_c = W_q[c]·x + b_q[c]  ->  q_c / s

RoPE rotates channel pairs ``(a, b)`` by a position-dependent angle. A rotation commutes with a
scaling of *both* channels of its pair by the same ``s`` (``R(θ)·sI = sI·R(θ)``), so whole pairs
are scaled: ``(i, i + r/2)`` for rotate-half RoPE (Llama, Qwen2, Mistral, Phi-3, Gemma, GPT-NeoX,
Falcon), ``(2i, 2i + 1)`` for interleaved RoPE (GPT-J), and only the first ``r`` channels pair up
when the rotary part is partial (``partial_rotary_factor``, ``rotary_dim``); the rest are single.
With GQA the query channels are scaled in every query head that reads the KV head. Values, the
softmax scale and everything else are untouched, so the model computes the same function up to
float rounding (tested: max |Δlogit| ≤ 1e-3 in fp32) while its cached keys now carry outliers.

Which pairs: per layer and KV head, the ``pairs`` rotary pairs whose key-projection rows (and
bias) have the largest norm, i.e. the channels that are already the largest, as outlier channels
are in real models.

>>> report = apply_stress(model, "scale=16,layers=0-3,pairs=4")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kvq.eval.errors import EvalError

DEFAULT = "scale=16,layers=0-3,pairs=4"
_INTERLEAVED = ("gptj", "codegen")  # RoPE on adjacent channel pairs (rotate_every_two)


@dataclass(frozen=True)
class StressSpec:
    """Key channels of ``layers`` (None: all) scaled by ``scale``: ``pairs`` RoPE pairs per KV
    head (units of one channel beyond the rotary part)."""

    scale: float = 16.0
    layers: tuple[int, ...] | None = (0, 1, 2, 3)
    pairs: int = 4

    @classmethod
    def parse(cls, text: str | None) -> StressSpec:
        """``"scale=8,layers=0-3,pairs=4"``; any key may be left out; ``layers=all``;
        ``"default"`` or ``""`` gives :data:`DEFAULT`."""
        text = DEFAULT if text in (None, "", "default") else text
        values = {}
        for part in text.split(","):
            key, eq, val = part.partition("=")
            key, val = key.strip(), val.strip()
            if not eq or key not in ("scale", "layers", "pairs"):
                raise EvalError(f"--stress: cannot read {part.strip()[:40]!r}; expected "
                                f"key=value with keys scale, layers, pairs (e.g. {DEFAULT!r})")
            try:
                if key == "scale":
                    values[key] = float(val)
                elif key == "pairs":
                    values[key] = int(val)
                else:
                    values[key] = None if val == "all" else _layers(val)
            except ValueError:
                raise EvalError(f"--stress: bad value for {key}: {val[:40]!r} (e.g. "
                                f"{DEFAULT!r})") from None
        spec = cls(**values)
        if not (spec.scale > 0 and spec.scale < 1e4) or spec.pairs < 1:
            raise EvalError(f"--stress: scale must be in (0, 1e4) and pairs >= 1, got "
                            f"scale={spec.scale}, pairs={spec.pairs}")
        return spec

    def label(self) -> str:
        layers = "all" if self.layers is None else "+".join(str(i) for i in self.layers)
        return f"scale={self.scale:g},layers={layers},pairs={self.pairs}"


def _layers(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in text.replace(" ", "").split("+"):
        lo, dash, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    if not out or min(out) < 0:
        raise ValueError(text)
    return tuple(sorted(set(out)))


def rotary_units(head_dim: int, rotary_dim: int, interleaved: bool) -> list[tuple[int, ...]]:
    """Channel groups that RoPE rotates together: pairs in the rotary part, singles after it."""
    r = rotary_dim - rotary_dim % 2
    if interleaved:
        units = [(2 * i, 2 * i + 1) for i in range(r // 2)]
    else:
        units = [(i, i + r // 2) for i in range(r // 2)]
    return units + [(c,) for c in range(r, head_dim)]


def apply_stress(model, spec: StressSpec | str | None = None) -> dict:
    """Scale key/query channels of ``model`` in place (see the module doc); returns what was done:
    ``{"spec", "layers": {layer: {kv_head: [channels]}}}``."""
    if not isinstance(spec, StressSpec):
        spec = StressSpec.parse(spec)
    cfg = model.config.get_text_config(decoder=True)
    n_layers = cfg.num_hidden_layers
    layers = range(n_layers) if spec.layers is None else spec.layers
    bad = [i for i in layers if i >= n_layers]
    if bad:
        raise EvalError(f"--stress: layer {bad[0]} does not exist; the model has {n_layers} "
                        f"layers (0..{n_layers - 1})")
    modules = {m.layer_idx: m for m in model.modules()
               if isinstance(getattr(m, "layer_idx", None), int)
               and "attention" in type(m).__name__.lower()}
    layout = _Layout(model.config)
    done: dict = {}
    with torch.no_grad():
        for i in layers:
            if i not in modules:
                raise EvalError(f"--stress: cannot find the attention module of layer {i}")
            done[i] = layout.scale(modules[i], spec)
    return {"spec": spec.label(), "scale": spec.scale, "pairs": spec.pairs, "layers": done,
            "settings": asdict(spec)}


class _Layout:
    """Where query and key channels sit in a model family's projection weights."""

    def __init__(self, config):
        cfg = config.get_text_config(decoder=True)
        self.type = cfg.model_type
        self.heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        from kvq.hf.geometry import kv_geometry

        self.kv_heads = kv_geometry(config).kv_heads
        self.groups = self.heads // self.kv_heads
        rope = getattr(cfg, "rope_parameters", None) or {}
        if self.type in _INTERLEAVED:
            rot = getattr(cfg, "rotary_dim", None) or self.head_dim
        elif getattr(cfg, "alibi", False) or self.type in ("gpt2", "opt"):
            rot = 0
        else:
            factor = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
            rot = int(self.head_dim * (factor or 1.0))
        self.units = rotary_units(self.head_dim, rot, self.type in _INTERLEAVED)

    def scale(self, attn, spec: StressSpec) -> dict[int, list[int]]:
        if hasattr(attn, "k_norm") or hasattr(attn, "q_norm"):
            raise EvalError(f"--stress: model type {self.type!r} normalises q/k per head "
                            "(q_norm/k_norm) after the projection; stress is not supported there")
        q_lin, q_row, k_lin, k_row = self._rows(attn)
        out = {}
        for h in range(self.kv_heads):
            kw = k_lin.weight[[k_row(h, c) for c in range(self.head_dim)]]
            size = kw.float().pow(2).sum(dim=-1)
            if k_lin.bias is not None:
                size = size + k_lin.bias[[k_row(h, c) for c in range(self.head_dim)]].float() ** 2
            ranked = sorted(self.units, key=lambda u: -float(sum(size[c] for c in u)))
            chosen = sorted(c for u in ranked[:spec.pairs] for c in u)
            for c in chosen:
                _scale_row(k_lin, k_row(h, c), spec.scale)
                for j in range(h * self.groups, (h + 1) * self.groups):
                    _scale_row(q_lin, q_row(j, c), 1.0 / spec.scale)
            out[h] = chosen
        for lin in {id(q_lin): q_lin, id(k_lin): k_lin}.values():
            if not torch.isfinite(lin.weight).all():
                raise EvalError(f"--stress: scale {spec.scale} overflows the model's "
                                f"{lin.weight.dtype} weights; use a smaller scale")
        return out

    def _rows(self, attn):
        d, hq, g = self.head_dim, self.heads, self.groups
        if isinstance(getattr(attn, "q_proj", None), torch.nn.Linear) and isinstance(
                getattr(attn, "k_proj", None), torch.nn.Linear):
            return attn.q_proj, lambda j, c: j * d + c, attn.k_proj, lambda h, c: h * d + c
        if isinstance(getattr(attn, "qkv_proj", None), torch.nn.Linear):  # Phi-3: [q | k | v]
            lin = attn.qkv_proj
            return lin, lambda j, c: j * d + c, lin, lambda h, c: hq * d + h * d + c
        lin = getattr(attn, "query_key_value", None)
        if isinstance(lin, torch.nn.Linear) and self.type == "gpt_neox":  # per head [q k v]
            return lin, lambda j, c: j * 3 * d + c, lin, lambda h, c: h * 3 * d + d + c
        if isinstance(lin, torch.nn.Linear) and self.type == "falcon":
            if attn.new_decoder_architecture:  # per KV group [q x g, k, v]
                return (lin, lambda j, c: ((j // g) * (g + 2) + j % g) * d + c,
                        lin, lambda h, c: (h * (g + 2) + g) * d + c)
            if attn.multi_query:  # [q x heads, k, v]
                return lin, lambda j, c: j * d + c, lin, lambda h, c: hq * d + c
            return lin, lambda j, c: (j * 3) * d + c, lin, lambda h, c: (h * 3 + 1) * d + c
        raise EvalError(f"--stress: kvq does not know where query/key channels sit in model type "
                        f"{self.type!r} (supported: separate q_proj/k_proj, Phi-3 qkv_proj, "
                        "GPT-NeoX and Falcon query_key_value)")


def _scale_row(lin: torch.nn.Linear, row: int, factor: float) -> None:
    lin.weight[row] *= factor
    if lin.bias is not None:
        lin.bias[row] *= factor
