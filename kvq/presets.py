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
- ``fp16``: no quantization (K/V stored unchanged), the reference point.

llama.cpp's KV cache types (``-ctk/-ctv``), fixed widths, see :data:`GGML`:
``q4_0``, ``q4_1``, ``q8_0`` and ``q4_0-rot``, ``q4_1-rot``, ``q8_0-rot`` (with the Hadamard
rotation recent llama.cpp applies when the cache is quantized).
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
}


# llama.cpp's cache types. Source: ggml-org/llama.cpp, `ggml/src/ggml-quants.c` (formats, whose
# Python reference is gguf-py `gguf/quants.py`) and `src/llama-kv-cache.cpp` (rotation: since
# PR #21038, 2026-04, a quantized K cache is multiplied by the normalised Walsh-Hadamard matrix of
# the largest power-of-two block >= 64 dividing head_dim, V by 64x64 blocks, when head_dim % 64
# == 0; LLAMA_ATTN_ROT_DISABLE=1 turns it off). kvq's `rot(hadamard)` is that matrix for the
# power-of-two head dims llama.cpp models have.
GGML_ROT_KEYS, GGML_ROT_VALUES = "rot(hadamard)>{q}", "rot(hadamard,block=64)>{q}"
GGML: dict[str, str] = {
    "q4_0": "llama.cpp `-ctk q4_0 -ctv q4_0`: blocks of 32, fp16 scale, 16 levels (4.5 bits)",
    "q4_1": "llama.cpp `-ctk q4_1 -ctv q4_1`: blocks of 32, fp16 scale and min (5.0 bits)",
    "q8_0": "llama.cpp `-ctk q8_0 -ctv q8_0`: blocks of 32, fp16 scale, int8 (8.5 bits)",
}


def make_preset(name: str, keys: str | list, values: str | list) -> KVConfig:
    return KVConfig(name=name, keys=Pipeline.parse(keys), values=Pipeline.parse(values))


def builtin_presets() -> dict[str, partial]:
    """name -> factory returning the KVConfig."""
    out = {"fp16": partial(make_preset, "fp16", "none", "none")}
    for family, (keys, values) in FAMILIES.items():
        for b in BITS:
            name = f"{family}{b}"
            out[name] = partial(make_preset, name, keys.format(b=b), values.format(b=b))
    for q, doc in GGML.items():
        # a step list, not the string: a lone name in a spec string would resolve to this preset
        out[q] = _documented(partial(make_preset, q, [q], [q]), doc + ", no rotation "
                             "(llama.cpp before 2026-04 or LLAMA_ATTN_ROT_DISABLE=1)")
        rotated = partial(make_preset, f"{q}-rot", GGML_ROT_KEYS.format(q=q),
                          GGML_ROT_VALUES.format(q=q))
        out[f"{q}-rot"] = _documented(rotated, doc + ", with llama.cpp's automatic Hadamard "
                                      "rotation (K: whole head, V: blocks of 64)")
    return out


def _documented(factory: partial, doc: str) -> partial:
    factory.__doc__ = doc
    return factory


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
