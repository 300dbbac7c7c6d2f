"""One calibration forward that records what each layer's attention really sees.

A transformers attention function registered as ``kvq_capture`` (``AttentionInterface``) records,
per layer, the queries after RoPE (batch, heads, seq, head_dim) at a sample of positions, the keys
after RoPE and the values as the cache hands them to attention, before the GQA repeat (batch,
kv_heads, seq, head_dim), then runs the model's usual SDPA. A forward hook on ``k_proj`` (where
the attention module has one) gives the keys before RoPE. Forward hooks on the attention modules
and ``output_hidden_states`` give each layer's weight in the residual stream (see
:class:`LayerCapture`). The model's attention implementation is restored afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvq.eval.errors import EvalError

NAME = "kvq_capture"


@dataclass
class LayerCapture:
    """Tensors of one layer for one window.

    ``q``: (batch, heads, n_queries, head_dim) at ``positions``; ``k``/``v``: (batch, kv_heads,
    seq, head_dim); ``k_pre``: keys before RoPE or None. ``weight``: mean squared norm of the
    attention block's output (after the output projection) over that of the residual stream
    entering the layer, i.e. how much a relative error of this layer's attention moves the
    residual stream (None when the model's modules could not be matched).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_pre: torch.Tensor | None
    positions: torch.Tensor
    scaling: float
    sliding_window: int | None
    weight: float | None = None


def query_positions(seq: int, n: int) -> torch.Tensor:
    """``n`` query positions spread evenly over 1..seq-1 (all of them when ``n >= seq - 1``)."""
    if n >= seq - 1:
        return torch.arange(1, seq)
    return torch.linspace(1, seq - 1, n).round().long().unique()


def capture(model, ids: torch.Tensor, n_queries: int = 128) -> list[LayerCapture]:
    """Run ``model`` on ``ids`` (batch, seq) once; one :class:`LayerCapture` per layer."""
    positions = query_positions(ids.shape[1], n_queries).to(ids.device)
    found: dict[int, dict] = {}
    attn_out: dict[int, float] = {}

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        idx = getattr(module, "layer_idx", None)
        if idx is not None:
            found[idx] = dict(q=query[:, :, positions].detach().float(), k=key.detach().float(),
                              v=value.detach().float(),
                              scaling=float(scaling) if scaling else key.shape[-1] ** -0.5,
                              sliding_window=kwargs.get("sliding_window"))
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, **kwargs)

    handles, pre = [], {}
    for m in _attention_modules(model):
        idx = m.layer_idx
        handles.append(m.register_forward_hook(
            lambda _m, _a, out, i=idx: attn_out.__setitem__(i, _sq(out[0] if isinstance(out, tuple)
                                                                 else out))))
        kp = getattr(m, "k_proj", None)
        if isinstance(kp, torch.nn.Linear) and not hasattr(m, "k_norm"):
            handles.append(kp.register_forward_hook(
                lambda _m, _a, out, i=idx: pre.__setitem__(i, out.detach().float())))
    try:
        with _attention_function(model, attention), torch.no_grad():
            out = model(ids, use_cache=False, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    missing = [i for i in range(n_layers) if i not in found]
    if missing:
        raise EvalError(f"model type {model.config.model_type!r}: layer {missing[0]}'s attention "
                        "does not go through transformers' AttentionInterface, so kvq diagnose "
                        "cannot see its queries; use a model whose attention does (Llama, "
                        "Qwen2, Mistral, Phi-3, Gemma, GPT-NeoX, GPT-J...)")
    hidden = out.hidden_states
    result = []
    for i in range(n_layers):
        f = found[i]
        k_pre = pre.get(i)
        if k_pre is not None:
            b, t, _ = k_pre.shape
            k_pre = k_pre.view(b, t, -1, f["k"].shape[-1]).transpose(1, 2)
            if k_pre.shape != f["k"].shape:
                k_pre = None
        weight = None
        if i in attn_out and hidden is not None and len(hidden) > i:
            weight = attn_out[i] / max(_sq(hidden[i]), 1e-30)
        result.append(LayerCapture(f["q"], f["k"], f["v"], k_pre, positions.cpu(), f["scaling"],
                                   f["sliding_window"], weight))
    return result


def _sq(x: torch.Tensor) -> float:
    """Mean over tokens of the squared L2 norm of (batch, seq, hidden)."""
    return float(x.detach().float().pow(2).sum(dim=-1).mean())


def _attention_modules(model) -> list:
    return [m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int)
            and "attention" in type(m).__name__.lower()]


@contextmanager
def _attention_function(model, fn):
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, fn)
    old = model.config._attn_implementation
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, TypeError) as err:
        raise EvalError(f"model type {model.config.model_type!r} cannot switch its attention "
                        f"function, so kvq diagnose cannot capture its queries: {err}") from None
    if model.config._attn_implementation != NAME:
        raise EvalError(f"model type {model.config.model_type!r} does not route attention "
                        "through transformers' AttentionInterface; kvq diagnose cannot capture "
                        "its queries")
    try:
        yield
    finally:
        model.set_attn_implementation(old)
