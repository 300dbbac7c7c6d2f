"""Named K/V configurations so methods can be compared by name (``kvq list`` shows them).

Each family exists at 2, 3, 4 and 8 bits (``naive4``, ``naive3``, ...):

- ``naive{b}``: per-token symmetric absmax (the seed's "naive INT4"), keys and values.
- ``nsep{b}`` / ``pchan{b}``: the seed's ablations (norm separation only / per-channel only).
- ``nsep-pchan{b}``: the seed method, norm separation + per-channel scales (renormalised).
- ``kivi{b}``: KIVI, keys per channel in groups of 32 tokens, values per token in groups of 32
  channels, asymmetric.
- ``quanto{b}``: like transformers' QuantizedCache with optimum-quanto: groups of 64 channels,
  asymmetric, keys and values.
- ``quarot{b}``: QuaRot-like Hadamard rotation then per-token asymmetric.
- ``kvquant{b}``: KVQuant's recipe *without calibration*: pre-RoPE keys, the first token kept
  exact (1 sink), 1% dense-and-sparse outliers (keys per channel in each block, values per
  token), per-channel keys, per-token values, min-max normalization with *uniform* levels
  (``int{b}(asym)``) and per-block key scales. The calibrated version, with ``nuq(b)``
  codebooks and static key scales fitted per layer and K/V, is what ``kvq calibrate --recipe
  kvquant{b}`` writes (see :data:`RECIPES` and docs/kvquant.md).
- ``fp16``: no quantization (K/V stored unchanged), the reference point.
"""

from __future__ import annotations

from functools import partial

from kvq.kvconfig import KVConfig
from kvq.pipeline import Pipeline

BITS = (2, 3, 4, 8)

FAMILIES: dict[str, tuple[str, str]] = {
    "naive": ("ptok>int{b}", "ptok>int{b}"),
    "nsep": ("nsep>ptok>int{b}", "nsep>ptok>int{b}"),
    "pchan": ("pchan>int{b}", "pchan>int{b}"),
    "nsep-pchan": ("nsep>pchan>int{b}", "nsep>pchan>int{b}"),
    "kivi": ("group(32,token)>int{b}(asym)", "group(32)>int{b}(asym)"),
    "quanto": ("group(64)>int{b}(asym)", "group(64)>int{b}(asym)"),
    "quarot": ("rot>ptok>int{b}(asym)", "rot>ptok>int{b}(asym)"),
    "kvquant": ("sparse(0.01,channel)>pchan>int{b}(asym)", "sparse(0.01)>ptok>int{b}(asym)"),
}

#: cache options of a family's presets (KVConfig fields)
FAMILY_OPTIONS: dict[str, dict] = {"kvquant": {"key_rope": "pre", "sinks": 1}}

#: what ``kvq calibrate --recipe NAME`` fits: keys / values specs ending in ``nuq(b...)``, and
#: KVConfig options. KVQuant: pre-RoPE keys with offline per-channel scales, per-token values,
#: 1% dense-and-sparse outliers, calibrated codebooks, the first token kept exact.
RECIPES: dict[str, dict] = {
    f"kvquant{b}": {"keys": f"sparse(0.01,channel)>nuq({b},scale=static)",
                    "values": f"sparse(0.01)>ptok>nuq({b})", "key_rope": "pre", "sinks": 1}
    for b in (2, 3, 4)
}


def make_preset(name: str, keys: str, values: str, **options) -> KVConfig:
    return KVConfig(name=name, keys=Pipeline.parse(keys), values=Pipeline.parse(values),
                    **options)


def builtin_presets() -> dict[str, partial]:
    """name -> factory returning the KVConfig."""
    out = {"fp16": partial(make_preset, "fp16", "none", "none")}
    for family, (keys, values) in FAMILIES.items():
        for b in BITS:
            name = f"{family}{b}"
            out[name] = partial(make_preset, name, keys.format(b=b), values.format(b=b),
                                **FAMILY_OPTIONS.get(family, {}))
    return out


def presets() -> dict[str, KVConfig]:
    """Every registered preset (built-in and from plugins), built."""
    from kvq.registry import PRESETS

    return {e.name: e.load()() for e in PRESETS.entries()}


def with_bits(name: str, bits: int) -> str:
    """The same preset family at another bit width: ``with_bits("naive4", 3) == "naive3"``."""
    family = name.rstrip("0123456789")
    if family not in FAMILIES:
        from kvq.errors import SpecError

        raise SpecError(f"{name!r} is not a preset family with bit variants",
                        suggestion="families: " + ", ".join(FAMILIES))
    return f"{family}{bits}"
