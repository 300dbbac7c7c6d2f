"""memory_report: bytes a KVQCache really holds, per layer and in total, vs fp16."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class LayerMemory:
    """Bytes held by one layer (keys and values together).

    quantized_bytes: packed codes + all metadata (norms, scales, zeros) of the quantized blocks.
    residual_bytes: the exact residual window, in the model dtype.
    working_bytes: the dequantized working copy (``keep_dequantized=True`` only).
    fp16_bytes: what the same tokens take in an fp16 cache (2 bytes per element).
    sink_tokens, sink_bytes: exact sink tokens per row (``sinks=n``) and their bytes (K/V in the
        model dtype and their positions), held beside the blocks.
    rope_bytes: the rotary positions of the tokens (pre-RoPE keys), one table per cache: counted
        in the total row only.
    """

    layer: int
    quantized_tokens: int
    residual_tokens: int
    quantized_bytes: int
    residual_bytes: int
    working_bytes: int
    fp16_bytes: int
    elements_quantized: int
    sink_tokens: int = 0
    sink_bytes: int = 0
    rope_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return (self.quantized_bytes + self.residual_bytes + self.working_bytes + self.sink_bytes
                + self.rope_bytes)

    @property
    def side_bytes(self) -> int:
        """What the quantized tokens need besides their blocks: exact sinks, rotary positions."""
        return self.sink_bytes + self.rope_bytes

    @property
    def bits_per_element(self) -> float:
        """Stored bits per quantized K/V element, metadata, sinks and rotary positions included
        (nan if none quantized)."""
        if not self.elements_quantized:
            return float("nan")
        return 8 * (self.quantized_bytes + self.side_bytes) / self.elements_quantized

    @property
    def quantized_ratio(self) -> float:
        """Quantized part (with sinks and positions) vs fp16 for the same tokens (nan if none
        quantized)."""
        if not self.elements_quantized:
            return float("nan")
        return (self.quantized_bytes + self.side_bytes) / (2 * self.elements_quantized)

    @property
    def ratio(self) -> float:
        """Everything held vs an fp16 cache of the same tokens."""
        return self.total_bytes / self.fp16_bytes if self.fp16_bytes else float("nan")


@dataclass(frozen=True)
class MemoryReport:
    """Per-layer rows and their total (``total.layer == -1``)."""

    layers: list[LayerMemory]
    total: LayerMemory

    def as_dict(self) -> dict:
        def row(m: LayerMemory) -> dict:
            out = {f.name: getattr(m, f.name) for f in fields(m)}
            out.update(total_bytes=m.total_bytes, side_bytes=m.side_bytes,
                       bits_per_element=m.bits_per_element,
                       quantized_ratio=m.quantized_ratio, ratio=m.ratio)
            return out

        return {"layers": [row(m) for m in self.layers], "total": row(self.total)}

    def __str__(self) -> str:
        head = (f"{'layer':>5} {'q tok':>6} {'res tok':>7} {'quantized':>11} {'residual':>10} "
                f"{'working':>10} {'sinks+pos':>9} {'fp16':>11} {'bits/el':>7} {'q/fp16':>6} "
                f"{'all/fp16':>8}")
        lines = [head]
        for m in [*self.layers, self.total]:
            name = "total" if m.layer < 0 else str(m.layer)
            lines.append(f"{name:>5} {m.quantized_tokens:>6} {m.residual_tokens:>7} "
                         f"{m.quantized_bytes:>11,} {m.residual_bytes:>10,} {m.working_bytes:>10,} "
                         f"{m.side_bytes:>9,} {m.fp16_bytes:>11,} {m.bits_per_element:>7.3f} "
                         f"{m.quantized_ratio:>6.3f} {m.ratio:>8.3f}")
        return "\n".join(lines)


def memory_report(cache) -> MemoryReport:
    """What ``cache`` (a :class:`~kvq.hf.KVQCache`) holds right now."""
    rows = [LayerMemory(layer=i, **layer.memory()) for i, layer in enumerate(cache.layers)]
    per_row = ("quantized_tokens", "residual_tokens", "sink_tokens")
    sums = {f.name: sum(getattr(r, f.name) for r in rows) for f in fields(LayerMemory)
            if f.name not in ("layer", *per_row)}
    sums["rope_bytes"] = cache.rope.nbytes if getattr(cache, "rope", None) is not None else 0
    first = rows[0] if rows else None
    total = LayerMemory(layer=-1, **{k: getattr(first, k) if first else 0 for k in per_row},
                        **sums)
    return MemoryReport(rows, total)
