"""Pre-RoPE keys: undo the model's rotary embedding before quantizing keys, redo it on read.

transformers models rotate keys (RoPE) before ``cache.update`` and pass the cache no angles
(docs/pre-rope-and-sinks.md). A :class:`RopeTracker`, one per cache, recovers them from the model
itself: a forward hook on the model's ``rotary_emb`` module records the ``position_ids`` of each
forward, the tracker keeps the rotary position of every cached token ((batch or 1, seq) int32),
and it asks that same module for ``(cos, sin)`` when a layer rotates keys, so rope scaling
(linear, llama3, yarn...) and its attention factor are the model's own. How the angles pair
channels differs between families; :data:`ADAPTERS` says it per ``model_type``:

- ``half`` (Llama, Qwen2, Mistral, Phi3, Gemma, GPT-NeoX, Falcon): the module returns
  ``(cos, sin)`` of shape (batch, seq, r) and channel i turns with channel i + r/2, for i < r/2;
  channels >= r (partial rotary: GPT-NeoX ``rotary_pct``, Phi3 ``partial_rotary_factor``) pass.
- ``interleaved`` (GPT-J): the module returns ``(sin, cos)`` of shape (batch, seq, r/2) and
  channel 2i turns with 2i + 1, for 2i < r (``rotary_dim``).

Rotation by θ with the module's (possibly scaled) cos and sin is the 2x2 map
``[[c, -s], [s, c]]``; its exact inverse is ``[[c, s], [-s, c]] / (c² + s²)``. Both run in
float32 and return the keys' dtype.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from kvq.errors import KVQError


@dataclass(frozen=True)
class RopeAdapter:
    """How one family's rotary module output pairs key channels."""

    pairs: str  # "half" or "interleaved"
    sin_first: bool = False  # the module returns (sin, cos)
    disabled_by: str | None = None  # config flag that turns RoPE off (Falcon's alibi)


_HALF = RopeAdapter("half")
ADAPTERS: dict[str, RopeAdapter] = {
    "llama": _HALF, "qwen2": _HALF, "mistral": _HALF, "phi3": _HALF, "gemma": _HALF,
    "gpt_neox": _HALF, "falcon": RopeAdapter("half", disabled_by="alibi"),
    "gptj": RopeAdapter("interleaved", sin_first=True),
}
#: rope types whose angles depend on the sequence length, not on the position alone: keys
#: written earlier were rotated with other frequencies than a later call would give.
STATEFUL_ROPE = ("dynamic", "longrope")


def rope_adapter(model_config) -> RopeAdapter:
    """The adapter for ``model_config``'s family; :class:`KVQError` if it has no (known) RoPE."""
    cfg = model_config.get_text_config(decoder=True)
    mtype = getattr(cfg, "model_type", type(cfg).__name__)
    adapter = ADAPTERS.get(mtype)
    if adapter is None:
        raise KVQError(f"keys 'rope: pre' needs a model with rotary position embeddings that kvq "
                       f"knows; model type {mtype!r} has none kvq can undo (supported: "
                       f"{', '.join(sorted(ADAPTERS))}); use 'rope: post' (the default) for it, "
                       "or add an adapter in kvq/hf/rope.py")
    if adapter.disabled_by and getattr(cfg, adapter.disabled_by, False):
        raise KVQError(f"keys 'rope: pre': this {mtype} model uses {adapter.disabled_by}, not "
                       "rotary embeddings; use 'rope: post' (the default)")
    params = getattr(cfg, "rope_parameters", None) or {}
    rtype = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if rtype in STATEFUL_ROPE:
        raise KVQError(f"keys 'rope: pre': rope_type {rtype!r} changes the angles of past keys "
                       "with the sequence length, so they cannot be recomputed from positions; "
                       "use 'rope: post' for this model")
    return adapter


def _turn(x: torch.Tensor, pairs: str) -> torch.Tensor:
    """The 90° partner of each channel: rotate_half (half) or rotate_every_two (interleaved)."""
    if pairs == "half":
        a, b = x.chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)


class RopeTracker:
    """Rotary positions of every token of one cache, and the model's rotation for them.

    ``positions`` is (1 or batch, seq) int32: row b's token t was rotated to position
    ``positions[b, t]`` (one row when all rows share positions). Layers call :meth:`sync` on each
    write, then :meth:`unrotate` / :meth:`rotate` on a range of cached tokens.
    """

    def __init__(self, adapter: RopeAdapter):
        self.adapter = adapter
        self.module: torch.nn.Module | None = None
        self.positions: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None  # position_ids of the running forward
        self._calling = False
        self._handle = None

    # model --------------------------------------------------------------------------------------
    def bind(self, model: torch.nn.Module) -> None:
        """Use the rotary module of ``model`` (the one module named ``rotary_emb``) for the
        angles, without watching forwards (positions then come from :attr:`positions`)."""
        found = [m for n, m in model.named_modules() if n.split(".")[-1] == "rotary_emb"]
        if len(found) != 1:
            what = "no module" if not found else f"{len(found)} modules"
            raise KVQError(f"keys 'rope: pre': {what} named 'rotary_emb' in "
                           f"{type(model).__name__}; kvq needs exactly one to read the rotation "
                           "angles (use 'rope: post' for this model)")
        self.detach()
        self.module = found[0]

    def attach(self, model: torch.nn.Module) -> None:
        """:meth:`bind`, and record the ``position_ids`` of every forward of the module."""
        self.bind(model)
        ref = weakref.ref(self)

        def hook(_module, args, kwargs, _output):
            tracker = ref()
            if tracker is not None and not tracker._calling:
                pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
                tracker._pending = pos if torch.is_tensor(pos) else None

        self._handle = self.module.register_forward_hook(hook, with_kwargs=True)
        weakref.finalize(self, self._handle.remove)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # positions ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    @property
    def nbytes(self) -> int:
        return 0 if self.positions is None else self.positions.numel() * 4

    def sync(self, start: int, length: int, layer_idx) -> None:
        """Make sure positions [start, start + length) are known: the first layer written in a
        forward appends that forward's ``position_ids``; the others find them recorded."""
        n = len(self)
        if n >= start + length:
            return
        pos, self._pending = self._pending, None
        if self.module is None:
            raise KVQError(f"layer {layer_idx} keeps pre-RoPE keys but the cache is not attached "
                           "to the model: build it with KVQCache(cfg, model) or call "
                           "cache.attach(model) first")
        if pos is None or n != start or pos.shape[-1] != length:
            got = "none" if pos is None else f"{pos.shape[-1]}"
            raise KVQError(f"layer {layer_idx}: {length} new keys at position {start} but the "
                           f"model's rotary embedding gave {got} positions (cache holds {n}); "
                           "pre-RoPE keys need every write to come from a forward of the "
                           "attached model")
        pos = pos.reshape(-1, length).to(torch.int32)
        if self.positions is None:
            self.positions = pos.clone()
            return
        old = self.positions
        if old.shape[0] != pos.shape[0]:
            rows = max(old.shape[0], pos.shape[0])
            if min(old.shape[0], pos.shape[0]) != 1:
                raise KVQError(f"layer {layer_idx}: position_ids for batch {pos.shape[0]} but "
                               f"the cache holds batch {old.shape[0]}")
            old, pos = old.expand(rows, -1), pos.to(old.device).expand(rows, -1)
        self.positions = torch.cat([old, pos.to(old.device)], dim=1)

    def crop(self, length: int) -> None:
        if self.positions is not None:
            self.positions = self.positions[:, :length]

    def map_batch(self, fn) -> None:
        """Batch ops (beam reorder, repeat, select); a shared single row stays shared."""
        if self.positions is not None and self.positions.shape[0] > 1:
            self.positions = fn(self.positions)

    def reset(self) -> None:
        self.positions = self._pending = None

    # rotation -----------------------------------------------------------------------------------
    def _cos_sin(self, start: int, length: int, k: torch.Tensor):
        """The module's own (cos, sin) for cached tokens [start, start + length), float32,
        (B, 1, length, r) with r the rotary channels."""
        pos = self.positions[:, start:start + length].to(device=k.device, dtype=torch.long)
        self._calling = True
        try:
            out = self.module(k.new_empty(0), position_ids=pos)
        finally:
            self._calling = False
        sin, cos = out if self.adapter.sin_first else out[::-1]
        cos, sin = cos.float()[:, None], sin.float()[:, None]
        if self.adapter.pairs == "interleaved":
            cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        if cos.shape[-1] > k.shape[-1] or cos.shape[-1] % 2:
            raise KVQError(f"the rotary embedding covers {cos.shape[-1]} channels but keys have "
                           f"head_dim {k.shape[-1]}")
        return cos, sin

    def _apply(self, k: torch.Tensor, start: int, inverse: bool) -> torch.Tensor:
        cos, sin = self._cos_sin(start, k.shape[-2], k)
        r = cos.shape[-1]
        x = k[..., :r].float()
        turned = _turn(x, self.adapter.pairs)
        if inverse:
            x = (x * cos - turned * sin) / (cos * cos + sin * sin)
        else:
            x = x * cos + turned * sin
        return torch.cat([x.to(k.dtype), k[..., r:]], dim=-1)

    def unrotate(self, k: torch.Tensor, start: int) -> torch.Tensor:
        """Post-RoPE keys (B, H, T, D) of cached tokens [start, start + T) -> pre-RoPE keys."""
        return self._apply(k, start, inverse=True)

    def rotate(self, k: torch.Tensor, start: int) -> torch.Tensor:
        """Pre-RoPE keys (B, H, T, D) of cached tokens [start, start + T) -> post-RoPE keys."""
        return self._apply(k, start, inverse=False)
