"""Pre-RoPE keys: undo the model's rotary embedding before quantizing keys, redo it on read.

transformers models rotate keys (RoPE) before ``cache.update`` and pass the cache no angles
(docs/pre-rope-and-sinks.md). A :class:`RopeTracker`, one per cache, recovers them from the model
itself: a forward hook on the model's ``rotary_emb`` module records the ``position_ids`` of each
forward, the tracker keeps the rotary position of every cached token ((batch or 1, seq) int32),
and it asks that same module for ``(cos, sin)`` when a layer rotates keys, so rope scaling
(linear, llama3, yarn...) and its attention factor are the model's own. How the angles pair
channels differs between families; :data:`ADAPTERS` says it per ``model_type``:

- ``half`` (Llama, Qwen2/3, Mistral, Phi3, Gemma 1/2/3, OLMo2, GPT-NeoX, Falcon, SmolLM3,
  gpt-oss): the module returns ``(cos, sin)`` of shape (batch, seq, r) (gpt-oss: r/2, one angle
  per pair) and channel i turns with channel i + r/2, for i < r/2; channels >= r (partial rotary:
  GPT-NeoX ``rotary_pct``, Phi3 ``partial_rotary_factor``) pass.
- ``interleaved`` (GPT-J, Cohere 1/2): channel 2i turns with 2i + 1, for 2i < r; GPT-J's module
  returns ``(sin, cos)`` of shape (batch, seq, r/2) (``rotary_dim``), Cohere's ``(cos, sin)``
  with each angle repeated for its pair.

Some families rotate only some layers or per layer type: Gemma 3's module takes the layer type
(local rotary for sliding layers, global for full ones), Cohere2 rotates its sliding layers only
and SmolLM3 the layers ``no_rope_layers`` marks; a layer without RoPE keeps its keys as given
(they are pre-RoPE already). DeepSeek-V3 caches a position-free latent as keys (and the rotated
shared key part in the values slot), so ``rope: pre`` is refused there: its keys have no RoPE.

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
    per_pair: bool = False  # the module returns one angle per channel pair (r/2 wide)
    by_layer_type: bool = False  # the module takes the layer type (Gemma 3: local / global)
    rotated: str = "all"  # layers with RoPE: "all", "sliding" (Cohere2), "no_rope_layers"


_HALF = RopeAdapter("half")
ADAPTERS: dict[str, RopeAdapter] = {
    "llama": _HALF, "qwen2": _HALF, "qwen3": _HALF, "mistral": _HALF,
    "phi3": _HALF, "gemma": _HALF, "gemma2": _HALF, "olmo2": _HALF, "gpt_neox": _HALF,
    "gemma3_text": RopeAdapter("half", by_layer_type=True),
    "falcon": RopeAdapter("half", disabled_by="alibi"),
    "gpt_oss": RopeAdapter("half", per_pair=True),
    "smollm3": RopeAdapter("half", rotated="no_rope_layers"),
    "gptj": RopeAdapter("interleaved", sin_first=True, per_pair=True),
    "cohere": RopeAdapter("interleaved"),
    "cohere2": RopeAdapter("interleaved", rotated="sliding"),
}
#: families whose cached keys carry no RoPE at all: why 'rope: pre' does not apply
NO_ROPE_KEYS = {
    "deepseek_v3": "DeepSeek-V3's multi-head latent attention caches its position-free latent "
                   "as keys (the rotated shared key part goes to the values slot), so its keys "
                   "have no RoPE to undo",
}
#: rope types whose angles depend on the sequence length, not on the position alone: keys
#: written earlier were rotated with other frequencies than a later call would give.
STATEFUL_ROPE = ("dynamic", "longrope")


def rope_adapter(model_config) -> RopeAdapter:
    """The adapter for ``model_config``'s family; :class:`KVQError` if it has no (known) RoPE."""
    cfg = model_config.get_text_config(decoder=True)
    mtype = getattr(cfg, "model_type", type(cfg).__name__)
    adapter = ADAPTERS.get(mtype)
    if mtype in NO_ROPE_KEYS:
        raise KVQError(f"keys 'rope: pre' does not apply to model type {mtype!r}: "
                       f"{NO_ROPE_KEYS[mtype]}; use 'rope: post' (the default), which stores "
                       "them as they come")
    if adapter is None:
        raise KVQError(f"keys 'rope: pre' needs a model with rotary position embeddings that kvq "
                       f"knows; model type {mtype!r} has none kvq can undo (supported: "
                       f"{', '.join(sorted(ADAPTERS))}); use 'rope: post' (the default) for it, "
                       "or add an adapter in kvq/hf/rope.py")
    if adapter.disabled_by and getattr(cfg, adapter.disabled_by, False):
        raise KVQError(f"keys 'rope: pre': this {mtype} model uses {adapter.disabled_by}, not "
                       "rotary embeddings; use 'rope: post' (the default)")
    params = getattr(cfg, "rope_parameters", None) or {}
    if not isinstance(params, dict):
        params = {}
    # per-layer-type parameters (Gemma 3): {"sliding_attention": {...}, "full_attention": {...}}
    nested = [p for p in params.values() if isinstance(p, dict)]
    for p in nested or [params]:
        rtype = p.get("rope_type", "default")
        if rtype in STATEFUL_ROPE:
            raise KVQError(f"keys 'rope: pre': rope_type {rtype!r} changes the angles of past "
                           "keys with the sequence length, so they cannot be recomputed from "
                           "positions; use 'rope: post' for this model")
    return adapter


def rotated_layers(model_config, adapter: RopeAdapter) -> tuple[bool, ...]:
    """Per layer: does the model rotate its keys (False: they reach the cache pre-RoPE)?"""
    from kvq.hf.geometry import kv_geometry

    geom = kv_geometry(model_config)
    if adapter.rotated == "sliding":
        return tuple(t == "sliding_attention" for t in geom.layer_types)
    if adapter.rotated == "no_rope_layers":
        flags = getattr(model_config.get_text_config(decoder=True), "no_rope_layers", None)
        if flags is None or len(flags) != geom.num_layers:
            raise KVQError("keys 'rope: pre': the config's no_rope_layers does not list every "
                           "layer, so kvq cannot tell which layers rotate their keys")
        return tuple(bool(f) for f in flags)
    return (True,) * geom.num_layers


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
    def for_layers(self, model_config) -> list[LayerRope | None]:
        """Per layer of ``model_config``: this tracker as that layer uses it (its layer type
        picks the rotary embedding), or None where the model does not rotate keys."""
        from kvq.hf.geometry import kv_geometry

        types = kv_geometry(model_config).layer_types
        return [LayerRope(self, t) if r else None
                for t, r in zip(types, rotated_layers(model_config, self.adapter))]

    def _cos_sin(self, start: int, length: int, k: torch.Tensor, layer_type: str | None):
        """The module's own (cos, sin) for cached tokens [start, start + length), float32,
        (B, 1, length, r) with r the rotary channels."""
        pos = self.positions[:, start:start + length].to(device=k.device, dtype=torch.long)
        extra = {"layer_type": layer_type} if self.adapter.by_layer_type else {}
        if self.adapter.by_layer_type and layer_type is None:
            raise KVQError("this model's rotary embedding depends on the layer type; rotate "
                           "keys through RopeTracker.for_layer(layer_type)")
        self._calling = True
        try:
            out = self.module(k.new_empty(0), position_ids=pos, **extra)
        finally:
            self._calling = False
        sin, cos = out if self.adapter.sin_first else out[::-1]
        cos, sin = cos.float()[:, None], sin.float()[:, None]
        if self.adapter.per_pair and self.adapter.pairs == "interleaved":
            cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        elif self.adapter.per_pair:
            cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
        if cos.shape[-1] > k.shape[-1] or cos.shape[-1] % 2:
            raise KVQError(f"the rotary embedding covers {cos.shape[-1]} channels but keys have "
                           f"head_dim {k.shape[-1]}")
        return cos, sin

    def _apply(self, k: torch.Tensor, start: int, inverse: bool,
               layer_type: str | None = None) -> torch.Tensor:
        cos, sin = self._cos_sin(start, k.shape[-2], k, layer_type)
        r = cos.shape[-1]
        x = k[..., :r].float()
        turned = _turn(x, self.adapter.pairs)
        if inverse:
            x = (x * cos - turned * sin) / (cos * cos + sin * sin)
        else:
            x = x * cos + turned * sin
        return torch.cat([x.to(k.dtype), k[..., r:]], dim=-1)

    def unrotate(self, k: torch.Tensor, start: int, layer_type: str | None = None
                 ) -> torch.Tensor:
        """Post-RoPE keys (B, H, T, D) of cached tokens [start, start + T) -> pre-RoPE keys."""
        return self._apply(k, start, inverse=True, layer_type=layer_type)

    def rotate(self, k: torch.Tensor, start: int, layer_type: str | None = None) -> torch.Tensor:
        """Pre-RoPE keys (B, H, T, D) of cached tokens [start, start + T) -> post-RoPE keys."""
        return self._apply(k, start, inverse=False, layer_type=layer_type)


class LayerRope:
    """One layer's view of a shared :class:`RopeTracker`: its layer type picks the rotary
    embedding where the model has one per type (Gemma 3's local and global)."""

    def __init__(self, tracker: RopeTracker, layer_type: str):
        self.tracker, self.layer_type = tracker, layer_type

    @property
    def adapter(self) -> RopeAdapter:
        return self.tracker.adapter

    @property
    def positions(self) -> torch.Tensor:
        return self.tracker.positions

    def cos_sin(self, start: int, length: int, like: torch.Tensor):
        """The rotary ``(cos, sin)`` of cached tokens [start, start + length) for this layer's
        type, fp32 (B, 1, length, r) (the fast decode path rotates key chunks with them)."""
        return self.tracker._cos_sin(start, length, like, self.layer_type)

    def sync(self, start: int, length: int, layer_idx) -> None:
        self.tracker.sync(start, length, layer_idx)

    def unrotate(self, k: torch.Tensor, start: int) -> torch.Tensor:
        return self.tracker.unrotate(k, start, self.layer_type)

    def rotate(self, k: torch.Tensor, start: int) -> torch.Tensor:
        return self.tracker.rotate(k, start, self.layer_type)
