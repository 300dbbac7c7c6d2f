"""KVQLayer: one layer of a :class:`~kvq.hf.KVQCache`, on transformers' ``DynamicLayer``.

What it holds, per layer, for keys and values (each (batch, kv_heads, seq, head_dim) in order):

    [ quantized blocks (bit-packed, :class:`~kvq.hf.blocks.BlockStore`) | residual window (exact) ]

New tokens enter the residual window. Whenever the window holds ``residual + block`` tokens or
more, its oldest whole blocks of ``block`` tokens are quantized (statistics over that block only)
and leave the window; quantized blocks are never quantized again. ``update`` returns the
dequantized blocks followed by the window, which the model's attention then uses.

The first write of a sequence (the prefill) is special, see ``prefill`` in :class:`KVQLayer`.

A sliding-window layer holds its window only, like transformers' ``DynamicSlidingWindowLayer``:
after each write, quantized blocks whose every token has left the window (no future query can
see them) are dropped, and so are exact tokens that left it. It holds the newest
``sliding_window - 1`` tokens plus at most one partly visible block. ``dropped`` counts the
tokens forgotten at the front; positions (sinks, rotary positions, padding) stay absolute.

Two options change what the blocks hold (docs/pre-rope-and-sinks.md): with ``rope`` (pre-RoPE
keys) key blocks are un-rotated before quantization and rotated again on read
(:mod:`kvq.hf.rope`); with ``sinks=n`` the first ``n`` real tokens of each row are kept exact
beside the blocks and out of their statistics (:mod:`kvq.hf.sinks`).
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers.cache_utils import DynamicLayer

from kvq.errors import KVQError
from kvq.hf.blocks import BlockStore
from kvq.hf.sinks import SinkStore
from kvq.hf.working import WorkingCopy

PrefillMode = Literal["quantized", "exact"]


class KVQLayer(DynamicLayer):
    """Quantize-on-write cache layer.

    Args:
        keys, values: the :class:`kvq.Pipeline` for this layer's keys and values.
        prefill: ``"quantized"``: every prompt token is quantized in the prefill forward and the
            prefill attention already sees the dequantized K/V (needed for single-pass
            perplexity). ``"exact"``: the prefill attention sees the exact K/V (as HF's
            ``QuantizedCache``); the prompt is then stored like decode tokens (exact window of the
            newest ``residual`` tokens, older ones quantized in blocks).
        residual: tokens kept exact in the residual window (0: quantize as soon as a block fills).
        block: tokens per quantized block; a multiple of the pipelines' ``token_block``; at least 2
            for pipelines with token-axis statistics.
        backend: kvq backend name (``"auto"``, ``"torch"``, ``"triton"``).
        keep_dequantized: also keep a dequantized working copy of the quantized blocks, so a
            decode step does not dequantize the whole cache (faster, but holds model-dtype K/V
            beside the packed blocks; :meth:`memory` counts it).
        sliding_window: for sliding-window attention layers (Mistral, Gemma 2/3...): ``update``
            returns and ``get_mask_sizes`` announces the same window as
            ``DynamicSlidingWindowLayer`` (``sliding_window - 1`` past tokens plus the new ones),
            and tokens that left the window are dropped (whole blocks, exact tokens), unless
            :meth:`activate_past_recording` asked to keep them until the next :meth:`crop`.
        rope: a :class:`~kvq.hf.rope.RopeTracker` shared by the cache's layers: keys are
            quantized before RoPE (``pre_rope`` is then True). None: keys as the model gives them.
        sinks: the first ``sinks`` real tokens of every row are kept exact (default 0).
        layer_idx: for error messages.

    ``self.keys`` / ``self.values`` are the residual window (as in HF's ``QuantizedLayer``).
    """

    def __init__(self, keys, values, *, prefill: PrefillMode = "quantized", residual: int = 128,
                 block: int = 32, backend: str = "auto", keep_dequantized: bool = False,
                 sliding_window: int | None = None, layer_idx: int | None = None,
                 rope=None, sinks: int = 0):
        super().__init__()
        self.rope, self.pre_rope = rope, rope is not None
        self.sinks, self.sink_store = sinks, SinkStore(sinks)
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.dropped = 0  # sliding layers: oldest tokens forgotten (left the window)
        self.record_past = False  # keep tokens that left the window until the next crop
        self.key_pipeline, self.value_pipeline = keys, values
        self.prefill, self.residual, self.block = prefill, residual, block
        self.keep_dequantized, self.layer_idx = keep_dequantized, layer_idx
        self.token_axis = keys.token_axis_stats or values.token_axis_stats
        self.k_store, self.v_store = BlockStore(keys, backend), BlockStore(values, backend)
        self.k_work, self.v_work = WorkingCopy(), WorkingCopy()  # keep_dequantized only
        self._valid: torch.Tensor | None = None  # (batch, N) bool: real tokens at positions < N
        self.fast = None  # kvq.hf.decode.FastDecode: decode steps hand attention the packed blocks

    def __repr__(self) -> str:
        return (f"KVQLayer(keys={self.key_pipeline.to_spec()!r}, values="
                f"{self.value_pipeline.to_spec()!r}, prefill={self.prefill!r}, "
                f"residual={self.residual}, block={self.block}, pre_rope={self.pre_rope}, "
                f"sinks={self.sinks})")

    # transformers CacheLayerMixin API ----------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h = key_states.shape[:2]
        self.keys = key_states.new_empty((b, h, 0, key_states.shape[-1]))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, T, D) K/V; return every cached token, (B, H, seq, D), in the input dtype."""
        if not self.is_initialized:
            self._check_pair(key_states, value_states)
            self.lazy_initialization(key_states, value_states)
        else:
            self._check(key_states, value_states)
        start = self.get_seq_length()
        first = start == 0
        t = key_states.shape[-2]
        if self.pre_rope:
            self.rope.sync(start, t, self.layer_idx)
        if self.sinks:
            self.sink_store.write(key_states, value_states, start,
                                  self._mask_slice(start, t, key_states.shape[0]))
        if self.keep_dequantized:
            self.k_work.write(start - self.dropped, key_states)
            self.v_work.write(start - self.dropped, value_states)
        visible = None  # tokens this write's queries can see (sliding layers), None: all held
        if self.is_sliding and (self.record_past or not first):
            visible = min(start, self.sliding_window - 1) + t
        if first and self.prefill == "quantized":
            self._write_prefill(key_states, value_states)
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            if self.is_sliding and not self.record_past:  # never quantize what no query sees
                self._evict(self.sliding_window - 1 if first else visible)
            self._flush()
        if first and self.prefill == "exact":
            keys, values = key_states, value_states
        else:
            if self.fast is not None and not first:
                # attention reads the held blocks after this returns: evicted on the next write
                packed = self.fast.read(self, t, visible)
                if packed is not None:
                    return packed
            keys, values = self._read()
            if visible is not None:
                keys, values = keys[:, :, -visible:], values[:, :, -visible:]
        if self.is_sliding and not self.record_past:
            self._evict(self.sliding_window - 1)
        return keys, values

    def activate_past_recording(self) -> None:
        """Keep the tokens that leave a sliding window until the next :meth:`crop` (transformers
        calls it before assisted decoding, to roll back rejected tokens)."""
        self.record_past = True

    def get_seq_length(self) -> int:
        """Tokens written (dropped ones included), as ``DynamicSlidingWindowLayer`` counts."""
        return self.dropped + self.held if self.is_initialized else 0

    @property
    def held(self) -> int:
        """Tokens held: quantized blocks and exact window (fewer than written on sliding layers
        once tokens left the window)."""
        return len(self.k_store) + self.keys.shape[-2] if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        seen = self.get_seq_length()
        if self.sliding_window is None:
            return seen + query_length, 0
        offset = max(seen - self.sliding_window + 1, 0)
        return min(seen, self.sliding_window - 1) + query_length, offset

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def reset(self) -> None:
        super().reset()
        self.k_store.clear()
        self.v_store.clear()
        self.k_work.clear()
        self.v_work.clear()
        self.sink_store.clear()
        self._valid = None
        self.dropped = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the newest ``-tokens_to_remove`` tokens (negative, as in ``DynamicLayer``). On a
        sliding layer, then drop what left the window (``crop(0)`` only that, as
        ``DynamicSlidingWindowLayer``); the tokens the next queries need must still be held."""
        if tokens_to_remove > 0:
            raise KVQError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        if not self.is_initialized:
            return
        drop = -tokens_to_remove
        if self.is_sliding:
            need = max(self.get_seq_length() - drop - (self.sliding_window - 1), 0)
            if need < self.dropped:
                raise KVQError(
                    f"layer {self.layer_idx}: crop({tokens_to_remove}) needs tokens this "
                    f"sliding-window layer already dropped (it holds the newest {self.held} of "
                    f"{self.get_seq_length()}, window {self.sliding_window}); call "
                    "cache.activate_past_recording() before the forwards to roll back")
            self._crop_held(drop)
            self._evict(self.sliding_window - 1)
            return
        if drop:
            self._crop_held(drop)

    def _crop_held(self, drop: int) -> None:
        res = self.keys.shape[-2]
        cut = min(drop, res)
        self.keys, self.values = self.keys[:, :, :res - cut], self.values[:, :, :res - cut]
        if drop > cut:
            self.k_store.crop(drop - cut)
            self.v_store.crop(drop - cut)
        self.sink_store.crop(self.get_seq_length())

    def _evict(self, keep: int) -> None:
        """Sliding layers: forget tokens older than the newest ``keep`` (no later query sees
        them): whole quantized blocks, and exact tokens once no block is left before them."""
        n = self.held - keep
        if n <= 0:
            return
        q = len(self.k_store)
        if n >= q:
            self.k_store.clear()
            self.v_store.clear()
            self.keys, self.values = self.keys[:, :, n - q:], self.values[:, :, n - q:]
            gone = n
        else:
            gone = self.k_store.drop_front(n)
            if self.v_store.drop_front(n) != gone:
                raise KVQError(f"layer {self.layer_idx}: key and value blocks are misaligned")
        if gone:
            self.dropped += gone
            self.k_work.drop_front(gone)
            self.v_work.drop_front(gone)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices])

    # padding ----------------------------------------------------------------------------------
    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Mark real tokens: ``attention_mask`` (batch, N), 1 = token, 0 = pad, for absolute
        positions 0..N-1 of this layer; later positions count as real. ``None`` clears it."""
        self._valid = None if attention_mask is None else attention_mask.to(torch.bool)

    # sizes ----------------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Bytes and tokens really held (K and V together)."""
        if not self.is_initialized:
            return dict(quantized_tokens=0, residual_tokens=0, quantized_bytes=0,
                        residual_bytes=0, working_bytes=0, fp16_bytes=0, elements_quantized=0,
                        sink_tokens=0, sink_bytes=0)
        b, h, r, d = self.keys.shape
        dv = self.values.shape[-1]
        nq = len(self.k_store)
        working = self.k_work.nbytes + self.v_work.nbytes
        return dict(
            quantized_tokens=nq, residual_tokens=r,
            quantized_bytes=self.k_store.nbytes + self.v_store.nbytes,
            residual_bytes=sum(t.numel() * t.element_size() for t in (self.keys, self.values)),
            working_bytes=working,
            fp16_bytes=2 * b * h * (nq + r) * (d + dv),
            elements_quantized=b * h * nq * (d + dv),
            sink_tokens=self.sink_store.tokens, sink_bytes=self.sink_store.nbytes)

    @property
    def nbytes(self) -> int:
        """Bytes really held: packed blocks with metadata, residual window, working copy, sinks."""
        m = self.memory()
        return m["quantized_bytes"] + m["residual_bytes"] + m["working_bytes"] + m["sink_bytes"]

    # internals ----------------------------------------------------------------------------------
    def _write_prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize every prompt token: whole blocks, then the tail as one shorter block. A lone
        tail token joins the last block (token statistics need two tokens); a one-token prompt
        stays in the window when the pipeline takes statistics over tokens."""
        t, blk = k.shape[-2], self.block
        n, tail = divmod(t, blk)
        if self.token_axis and tail == 1:
            if n == 0:
                self.keys, self.values = k.clone(), v.clone()
                return
            n, tail = n - 1, tail + blk
        if n:
            self._quantize(k[:, :, :n * blk], v[:, :, :n * blk], blk)
        if tail:
            self._quantize(k[:, :, n * blk:], v[:, :, n * blk:], tail)

    def _flush(self) -> None:
        """Quantize the oldest whole blocks while the window holds ``residual + block`` tokens."""
        excess = self.keys.shape[-2] - self.residual
        m = (excess // self.block) * self.block
        if m <= 0:
            return
        self._quantize(self.keys[:, :, :m], self.values[:, :, :m], self.block)
        self.keys, self.values = self.keys[:, :, m:].clone(), self.values[:, :, m:].clone()

    def _quantize(self, k: torch.Tensor, v: torch.Tensor, block: int) -> None:
        start = self.dropped + len(self.k_store)  # absolute position of k's first token
        valid = self._valid_slice(start, k.shape[-2], k.shape[0])
        if self.sinks and self.token_axis:  # sinks stay out of token-axis statistics
            sink = self.sink_store.mask(start, k.shape[-2], k.shape[0], k.device)
            if sink is not None:
                valid = ~sink if valid is None else valid & ~sink
        if self.pre_rope:
            k = self.rope.unrotate(k, start)
        dk, dv = self.fast.derive() if self.fast is not None else (None, None)
        qk = self.k_store.append(k.contiguous(), block, valid, dk)
        qv = self.v_store.append(v.contiguous(), block, valid, dv)
        if self.keep_dequantized:
            h = k.shape[1]
            kd, vd = self.k_store.unfold(qk, h), self.v_store.unfold(qv, h)
            if self.pre_rope:
                kd = self.rope.rotate(kd, start)
            self.sink_store.overwrite(kd, vd, start)
            self.k_work.write(start - self.dropped, kd)
            self.v_work.write(start - self.dropped, vd)

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held token, (B, H, held, D) each, oldest first (position ``dropped`` on)."""
        if self.keep_dequantized:
            return self.k_work.view(self.held), self.v_work.view(self.held)
        ks, vs = self.k_store.dequantize(), self.v_store.dequantize()
        if not ks:
            return self.keys, self.values
        if self.pre_rope:
            ks = [self.rope.rotate(torch.cat(ks, dim=-2), self.dropped)]
        keys, values = torch.cat([*ks, self.keys], dim=-2), torch.cat([*vs, self.values], dim=-2)
        self.sink_store.overwrite(keys, values, self.dropped)
        return keys, values

    def _mask_slice(self, start: int, length: int, batch: int) -> torch.Tensor | None:
        """Real-token mask (batch, length) for positions start.. (None: all real), from the
        padding mask whatever the pipelines; a pre-beam mask is expanded to ``batch``."""
        m = self._valid
        if m is None or start >= m.shape[1]:
            return None
        if m.shape[0] != batch:
            if batch % m.shape[0]:
                raise KVQError(f"padding mask has batch {m.shape[0]} but the K/V have batch "
                               f"{batch}; call cache.set_padding with the mask of this batch")
            m = self._valid = m.repeat_interleave(batch // m.shape[0], dim=0)  # beam expansion
        out = m[:, start:start + length]
        if out.shape[1] < length:
            out = torch.cat([out, out.new_ones(batch, length - out.shape[1])], dim=1)
        return out

    def _valid_slice(self, start: int, length: int, batch: int) -> torch.Tensor | None:
        """Real-token mask (batch, length) for absolute positions start.., or None (all real)."""
        return self._mask_slice(start, length, batch) if self.token_axis else None

    def _map_batch(self, fn) -> None:
        """Apply one batch-axis op to every tensor held (the padding mask too, when it is at the
        cache's batch; a mask still at the pre-beam batch is expanded when next used)."""
        if not self.is_initialized:
            return
        if self._valid is not None and self._valid.shape[0] == self.keys.shape[0]:
            self._valid = fn(self._valid)
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.k_store.map_batch(fn)
        self.v_store.map_batch(fn)
        self.k_work.map_batch(fn)
        self.v_work.map_batch(fn)
        self.sink_store.map_batch(fn)

    def _check_pair(self, k: torch.Tensor, v: torch.Tensor) -> None:
        where = f"layer {self.layer_idx}: " if self.layer_idx is not None else ""
        if k.dtype != v.dtype or k.device != v.device:
            raise KVQError(f"{where}keys are {k.dtype} on {k.device} but values are {v.dtype} on "
                           f"{v.device}; pass K and V of one dtype and device")
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise KVQError(f"{where}expected K/V of shape (batch, kv_heads, seq, head_dim), got "
                           f"{tuple(k.shape)} and {tuple(v.shape)}")

    def _check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self._check_pair(k, v)
        where = f"layer {self.layer_idx}: " if self.layer_idx is not None else ""
        if k.dtype != self.dtype:
            raise KVQError(f"{where}the cache holds {self.dtype} K/V but got {k.dtype}; a KVQCache "
                           "serves one model dtype: call cache.reset() or build a new cache")
        if k.device != self.device:
            raise KVQError(f"{where}the cache holds K/V on {self.device} but got them on "
                           f"{k.device}; call cache.reset() or build a new cache on that device")
        want = (self.keys.shape[0], self.keys.shape[1], self.keys.shape[3], self.values.shape[3])
        got = (k.shape[0], k.shape[1], k.shape[3], v.shape[3])
        if want != got:
            raise KVQError(f"{where}cached K/V have (batch, kv_heads, head_dim K, head_dim V) = "
                           f"{want} but new ones {got}; change the batch with reorder_cache / "
                           "batch_select_indices / batch_repeat_interleave, or reset() the cache")
