"""What every engine exporter shares: the model geometry, the result, the refusal, "closest".

An exporter is a module with ``ENGINE`` (its name) and ``export(cfg, model) -> Exported``. It
maps a :class:`~kvq.KVConfig` exactly onto what the engine runs, or raises :class:`Refused` with
a one-line reason and the closest configuration the engine *can* run (a KVConfig that
``kvq compare`` scores); :func:`kvq.export.export` exports that one only when asked
(``suggest=True``), marked ``exact=False``. Nothing is approximated silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvq.errors import KVQError
from kvq.kvconfig import KVConfig
from kvq.pipeline import Pipeline

#: tokens per block at which exporters compare bits/element (kvq compare's default block)
BLOCK = 32


@dataclass(frozen=True)
class Model:
    """The model an export is for: geometry, and its directory (checkpoint exporters copy it).

    ``config``: the model's ``config.json`` as a dict (None when only the geometry is known).
    """

    name: str
    num_layers: int
    kv_heads: int
    head_dim: int
    path: Path | None = None
    config: dict | None = None


@dataclass
class Exported:
    """An export: what the engine runs and the files that tell it so.

    ``config``: the exported configuration in kvq terms (the input when ``exact``, else the
    suggestion); ``files``: name -> text or bytes, written into ``--out``; ``copies``: name ->
    source path of large files copied unchanged (model weights); ``command``: the engine's
    command line; ``engine_args``: the same as a dict (vLLM's ``EngineArgs`` fields, llama.cpp's
    options); ``reason``: why the input was not exact (None when exact).
    """

    engine: str
    config: KVConfig
    exact: bool = True
    command: str | None = None
    engine_args: dict = field(default_factory=dict)
    files: dict[str, str | bytes] = field(default_factory=dict)
    copies: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reason: str | None = None


class Refused(KVQError):
    """The engine has no format for the config: ``reason``, and ``closest`` (a KVConfig) it runs."""

    def __init__(self, engine: str, reason: str, closest: KVConfig | None = None,
                 closest_text: str = ""):
        self.engine, self.reason, self.closest = engine, reason, closest
        hint = f"; closest: {closest_text}" if closest_text else ""
        more = " (--suggest exports it)" if closest is not None else ""
        super().__init__(f"{reason}{hint}{more}")


def per_layer(cfg: KVConfig, model: Model) -> list[tuple[Pipeline, Pipeline]]:
    """(keys, values) pipeline of every layer, after ``skip`` and overrides."""
    cfg.check(num_layers=model.num_layers, head_dim=model.head_dim)
    return [cfg.for_layer(i, model.num_layers) for i in range(model.num_layers)]


def unquantized(kv: tuple[Pipeline, Pipeline]) -> bool:
    return kv[0].is_identity and kv[1].is_identity


def common_refusal(engine: str, cfg: KVConfig) -> str | None:
    """What no serving engine here runs: keys quantized before RoPE, exact sink tokens."""
    if cfg.uses_pre_rope:
        return (f"{engine} quantizes keys after the rotary embedding; this config quantizes "
                "them before it (key_rope: pre)")
    if cfg.sinks:
        return f"{engine} keeps no exact sink tokens; this config keeps {cfg.sinks} (sinks:)"
    return None


def bits(cfg: KVConfig, model: Model) -> float:
    """Mean stored bits/element of ``cfg`` for the model (blocks of :data:`BLOCK` tokens)."""
    return cfg.bits_per_element(model.head_dim, BLOCK, model.num_layers)


def closest(target: float, candidates: dict[str, float]) -> str:
    """The candidate whose bits are nearest ``target`` (ties: the one with more bits)."""
    return min(candidates, key=lambda n: (abs(candidates[n] - target), -candidates[n]))
