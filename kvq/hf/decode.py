"""What ``KVQLayer.update`` hands the fast attention on a decode step: a :class:`DecodeView`.

With the fast attention on (:class:`FastDecode`), a decode step's ``update`` does not dequantize
the layer: it returns the exact residual window ``(keys, values)``, each (B, H, window, D), tagged
with a :class:`DecodeView` (attribute ``_kvq_view`` on the returned key tensor). The ``"kvq"``
attention function (:mod:`kvq.hf.attention`) finds the tag and attends over the packed blocks
plus the window; an untagged key is an ordinary full K/V (prefill, other caches) and goes to SDPA.
A caller that cannot use the view calls :meth:`DecodeView.materialize` for today's full K/V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvq.errors import KVQError, shorten
from kvq.hf.coverage import fast_path_reason_kv
from kvq.hf.fast_rope import RopeRead
from kvq.hf.fast_sinks import SinkRead
from kvq.hf.packed import Scratch, StreamReader

TAG = "_kvq_view"


class StepScratch:
    """One :class:`Scratch` shared by all layers of a cache during one decode forward: the
    buffers are allocated by the first layer, reused by the others (fresh multi-MB buffers per
    layer cost page faults) and freed after the last layer's attention, so nothing is held
    between steps. It also keeps the per-forward RoPE angles of pre-RoPE keys
    (:meth:`rope`), computed by the first layer that needs them."""

    def __init__(self) -> None:
        self.scratch: Scratch | None = None
        self.ropes: list = []  # ((tracker, layer type, start, end), positions, RopeRead)

    def get(self) -> Scratch:
        if self.scratch is None:
            self.scratch = Scratch()
        return self.scratch

    def release(self) -> None:
        self.scratch = None
        self.ropes = []

    def rope(self, rope, start: int, end: int, like: torch.Tensor, offset: int = 0
             ) -> RopeRead:
        """The :class:`RopeRead` of held tokens [start, end) of a layer's ``rope`` (a
        :class:`kvq.hf.rope.LayerRope`; ``offset`` tokens dropped before them), shared by the
        layers of one forward with the same rotary embedding and cached positions (recomputed
        when the positions changed: a new write, a beam reorder)."""
        key = (rope.tracker, rope.layer_type, start + offset, end + offset)
        for k, pos, found in self.ropes:
            if k[0] is key[0] and k[1:] == key[1:] and pos is rope.positions:
                return found
        found = RopeRead(rope, start, end, like, offset)
        self.ropes.append((key, rope.positions, found))
        return found


@dataclass
class DecodeView:
    """The visible K/V of one layer at one decode step, still packed.

    layer: the :class:`~kvq.hf.layer.KVQLayer` (its stores and window are read, not copied).
    start: first visible held token (> 0 only for sliding-window layers; a sliding layer holds
        its tokens from absolute position ``layer.dropped`` on).
    total: tokens held (visible ones are positions [start, total)).
    """

    layer: object
    start: int
    total: int
    readers: tuple[StreamReader, StreamReader]
    scratch: Scratch
    chunk_tokens: int  # tokens read per chunk (whole blocks; at least one block)
    step: StepScratch | None = None  # released by the cache's last layer (:meth:`done`)
    last: bool = False

    def done(self) -> None:
        """Attention is over: the last layer of a forward frees the step's scratch."""
        if self.last and self.step is not None:
            self.step.release()

    @property
    def visible(self) -> int:
        return self.total - self.start

    @property
    def quantized(self) -> int:
        return len(self.layer.k_store)

    def plan(self) -> list[tuple]:
        """Chunks to read, oldest first: (segment K, segment V, first block, end block, tokens
        to skip in the chunk, tokens to read), covering the visible quantized tokens."""
        out, pos, start = [], 0, self.start
        layer = self.layer
        for seg_k, seg_v in zip(layer.k_store.segments, layer.v_store.segments):
            blk, live = seg_k.block, seg_k.length
            nb = -(-live // blk)
            step = max(1, self.chunk_tokens // blk)
            for lo in range(max(start - pos, 0) // blk, nb, step):
                hi = min(lo + step, nb)
                a, z = pos + lo * blk, pos + min(hi * blk, live)  # absolute token range
                skip = max(start - a, 0)
                out.append((seg_k, seg_v, lo, hi, skip, z - a - skip))
            pos += live
        return out

    def rope_read(self) -> RopeRead | None:
        """Angles of the visible quantized keys when the layer stores them before RoPE."""
        layer = self.layer
        end = self.quantized
        if not getattr(layer, "pre_rope", False) or self.start >= end:
            return None
        step = self.step if self.step is not None else StepScratch()
        return step.rope(layer.rope, self.start, end, layer.keys, getattr(layer, "dropped", 0))

    def sinks(self) -> SinkRead | None:
        """The exact sinks among the visible quantized tokens, or None."""
        return SinkRead.of(self.layer, self.start, self.quantized)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The visible K/V dequantized, (B, H, visible, D) each: the general path's result."""
        k, v = self.layer._read()
        return k[:, :, self.start:], v[:, :, self.start:]


@dataclass
class FastDecode:
    """A layer's fast-decode switch: on when the model attends with ``"kvq"`` and both pipelines
    are covered (``reason`` says why not otherwise)."""

    keys: object
    values: object
    model_config: object
    scratch_elements: int = 2**21  # fp32 K (or V) values dequantized at a time: 8 MiB
    step: StepScratch | None = None  # shared by the cache's layers
    last: bool = False  # the cache's last layer: frees the step's scratch
    store_factors: bool = False  # keep the nsep factor beside each block (KVQCache factors=)

    def __post_init__(self) -> None:
        self.reason = fast_path_reason_kv(self.keys, self.values)
        self.readers = (StreamReader(self.keys), StreamReader(self.values))
        self._text_config = _text_config(self.model_config)  # read once: a per-step cost

    @property
    def active(self) -> bool:
        return (self.reason is None
                and getattr(self._text_config, "_attn_implementation", None) == "kvq")

    def derive(self) -> tuple:
        """What the layer stores beside new key / value blocks (the nsep factor), as callables
        ``QuantizedTensor -> dict`` or None; only while the fast path is in use."""
        if not (self.store_factors and self.active):
            return None, None
        return tuple(r.factors if r.renorm else None for r in self.readers)

    def read(self, layer, new_tokens: int, visible: int | None
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Tagged window for a one-token decode step, or None (use the general path)."""
        if new_tokens != 1 or not self.active or layer.keep_dequantized:
            if self.last and self.step is not None:
                self.step.release()
            return None
        total = layer.held  # sliding layers: tokens that left the window are gone
        start = 0 if visible is None else max(total - visible, 0)
        # the step's scratch: shared by the layers, freed after the last one's attention
        step = self.step or StepScratch()
        b, h, _, d = layer.keys.shape
        chunk = max(1, self.scratch_elements // (b * h * max(d, layer.values.shape[-1])))
        view = DecodeView(layer, start, total, self.readers, step.get(), chunk, step, self.last)
        keys, values = layer.keys[:, :, :], layer.values
        setattr(keys, TAG, view)
        return keys, values


def attach_fast_decode(layers, model_config, attention: str, factors: str = "recompute"
                       ) -> None:
    """Give every layer its :class:`FastDecode`.

    attention: ``"auto"`` (fast where covered), ``"fast"`` (raise :class:`KVQError` where it
    cannot be used), ``"dequantize"`` (never). factors: ``"recompute"`` (take the norm on every
    read) or ``"store"`` (keep the nsep factor beside each block).
    """
    if attention not in ("auto", "fast", "dequantize"):
        raise KVQError(f"attention={shorten(attention)}: use 'auto' (read packed blocks when the "
                       "model attends with 'kvq'), 'fast' (the same, or raise) or 'dequantize'")
    if factors not in ("store", "recompute"):
        raise KVQError(f"factors={shorten(factors)}: use 'recompute' (no extra bytes) or 'store' "
                       "(keep each block's nsep factor, fp32, beside it: faster decode)")
    if attention == "dequantize":
        return
    step = StepScratch()
    for i, layer in enumerate(layers):
        layer.fast = FastDecode(layer.key_pipeline, layer.value_pipeline, model_config,
                                step=step, last=i == len(layers) - 1,
                                store_factors=factors == "store")
        if attention != "fast":
            continue
        why = layer.fast.reason
        if why is None and layer.keep_dequantized:
            why = "keep_dequantized=True already serves decode from a dequantized copy"
        if why is None and attn_implementation(model_config) != "kvq":
            why = (f"the model attends with {attn_implementation(model_config)!r}; call "
                   "kvq.hf.enable_fast_attention(model) first")
        if why:
            raise KVQError(f"attention='fast' cannot be used for layer {layer.layer_idx}: {why}; "
                           "or use attention='auto' to fall back to dequantizing")


def attn_implementation(model_config) -> str | None:
    """The attention implementation the model's text config names (``"sdpa"``, ``"kvq"``...)."""
    return getattr(_text_config(model_config), "_attn_implementation", None)


def _text_config(model_config):
    if hasattr(model_config, "get_text_config"):
        return model_config.get_text_config(decoder=True)
    return model_config
