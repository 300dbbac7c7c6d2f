"""Named K/V configurations so methods can be compared by name (``kvq list`` shows them).

Families exist at several bit widths (``naive4``, ``naive3``, ...; 2, 3, 4 and 8 unless noted):

- ``naive{b}``: per-token symmetric absmax (the seed's "naive INT4"), keys and values.
- ``nsep{b}`` / ``pchan{b}``: the seed's ablations (norm separation only / per-channel only).
- ``nsep-pchan{b}``: the seed method, norm separation + per-channel scales (renormalised).
- ``kivi{b}``: KIVI, keys per channel in groups of 32 tokens, values per token in groups of 32
  channels, asymmetric.
- ``quanto{b}``: like transformers' QuantizedCache with optimum-quanto: groups of 64 channels,
  asymmetric, keys and values.
- ``quarot{b}``: QuaRot-like Hadamard rotation then per-token asymmetric.
- ``turboquant{b}`` (2, 3, 4): TurboQuant as vLLM 0.33 runs it (vllm/model_executor/layers/
  quantization/turboquant/): keys fp16 norm + Hadamard rotation + vLLM's own Lloyd-Max codebook
  (``lloyd{b}(none,vllm)``) with norm correction (``nsep`` renorm); values per-token asymmetric
  uniform, codes from the fp32 scale and min rounded half up, fp16 scale and min stored
  (``int{b}(asym,rounding=vllm)``); the first and last 2 layers unquantized, at most half of
  them (vLLM's ``get_boundary_skip_layers``). ``turboquant4`` is vLLM's ``turboquant_4bit_nc``,
  ``turboquant3`` its ``turboquant_3bit_nc``; ``turboquant2`` has **no vLLM counterpart**
  (vLLM has no 2-bit preset): the same recipe at 2 bits, kvq's extension.

One-off presets:

- ``turboquant-k8v4``: vLLM ``turboquant_k8v4``: keys cast to FP8 E4M3 with scale 1, saturating
  at +-448 as vLLM's store kernel does (on SM >= 8.9; below it vLLM uses ``float8e4b15``, which
  kvq does not model), 4-bit values as above.
- ``turboquant-k3v4``: vLLM ``turboquant_k3v4_nc``: 3-bit keys, 4-bit values.
- ``fp8`` / ``fp8-e5m2``: vLLM's / SGLang's FP8 KV cache format (``--kv-cache-dtype fp8``,
  E4M3; ``fp8_e5m2``), with a per-head scale computed per cache block (kvq has no offline
  calibration; vLLM's uncalibrated per-tensor scale 1.0 is ``fp8(e4m3,none)``).
- ``nvfp4``: NVIDIA NVFP4 (E2M1, E4M3 scale per 16 values, fp32 second-level scale).
- ``mxfp4``: OCP MX v1.0 MXFP4 (E2M1, E8M0 power-of-two scale per 32 values).
- ``kvquant{b}``: KVQuant's recipe *without calibration*: pre-RoPE keys, the first token kept
  exact (1 sink), 1% dense-and-sparse outliers by kvq's own fixed-count rule (keys ranked per
  channel in each block, values per token; KVQuant's static key thresholds and per-row value
  quantiles are not implemented, nor its Q-Norm), per-channel keys, per-token values, min-max
  normalization with *uniform* levels (``int{b}(asym)``) and per-block key scales. The
  calibrated version, with ``nuq(b)`` codebooks and static key scales fitted per layer and K/V,
  is what ``kvq calibrate --recipe kvquant{b}`` writes (see :data:`RECIPES` and docs/kvquant.md).
- ``fp16``: no quantization (K/V stored unchanged), the reference point.

llama.cpp's KV cache types (``-ctk/-ctv``), fixed widths, see :data:`GGML`:
``q4_0``, ``q4_1``, ``q8_0`` and ``q4_0-rot``, ``q4_1-rot``, ``q8_0-rot`` (with the Hadamard
rotation recent llama.cpp applies when the cache is quantized and head_dim % 64 == 0; at other
head dims llama.cpp, and so the ``-rot`` preset, stores the plain format).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from kvq.kvconfig import KVConfig
from kvq.pipeline import Pipeline

BITS = (2, 3, 4, 8)
VLLM_SKIP = (0, 1, -2, -1)  # vLLM TurboQuant keeps the first and last 2 layers unquantized
VLLM_OPTIONS = {"skip_limit": "half"}  # ... but never more than half of them
TQ_KEYS, TQ_VALUES = "nsep>rot>lloyd{b}(none,vllm)", "ptok>int{v}(asym,rounding=vllm)"


@dataclass(frozen=True)
class Family:
    """A preset family: key / value spec templates with ``{b}``, its bit widths, skipped layers."""

    keys: str
    values: str
    bits: tuple[int, ...] = BITS
    skip: tuple[int, ...] = ()
    options: dict = field(default_factory=dict)  # further KVConfig fields (key_rope, sinks)


FAMILIES: dict[str, Family | tuple[str, str]] = {
    "naive": ("ptok>int{b}", "ptok>int{b}"),
    "nsep": ("nsep>ptok>int{b}", "nsep>ptok>int{b}"),
    "pchan": ("pchan>int{b}", "pchan>int{b}"),
    "nsep-pchan": ("nsep>pchan>int{b}", "nsep>pchan>int{b}"),
    "kivi": ("group(32,token)>int{b}(asym)", "group(32)>int{b}(asym)"),
    "quanto": ("group(64)>int{b}(asym)", "group(64)>int{b}(asym)"),
    "quarot": ("rot>ptok>int{b}(asym)", "rot>ptok>int{b}(asym)"),
    "turboquant": Family(TQ_KEYS, TQ_VALUES.replace("{v}", "{b}"), (2, 3, 4), VLLM_SKIP,
                         VLLM_OPTIONS),
    "kvquant": Family("sparse(0.01,channel)>pchan>int{b}(asym)", "sparse(0.01)>ptok>int{b}(asym)",
                      (2, 3, 4), options={"key_rope": "pre", "sinks": 1}),
}

#: what ``kvq calibrate --recipe NAME`` fits: keys / values specs ending in ``nuq(b...)``, and
#: KVConfig options. KVQuant: pre-RoPE keys with offline per-channel scales, per-token values,
#: 1% dense-and-sparse outliers, calibrated codebooks, the first token kept exact.
RECIPES: dict[str, dict] = {
    f"kvquant{b}": {"keys": f"sparse(0.01,channel)>nuq({b},scale=static)",
                    "values": f"sparse(0.01)>ptok>nuq({b})", "key_rope": "pre", "sinks": 1}
    for b in (2, 3, 4)
} | {
    # transform coding (KVTC / SVDq-like): unit directions in a calibrated PCA basis per head,
    # bits allocated per channel by reverse water-filling; keys before RoPE, 1 sink
    f"tc{b}": {"keys": f"nsep>klt>alloc({b})", "values": f"nsep>klt>alloc({b})",
               "key_rope": "pre", "sinks": 1}
    for b in (2, 3, 4)
}

#: one-off presets: name -> (keys, values, skipped layers[, further KVConfig options])
FIXED: dict[str, tuple] = {
    "fp16": ("none", "none", ()),
    "turboquant-k8v4": ("fp8(e4m3,none,overflow=saturate)", TQ_VALUES.format(v=4), VLLM_SKIP,
                        VLLM_OPTIONS),
    "turboquant-k3v4": (TQ_KEYS.format(b=3), TQ_VALUES.format(v=4), VLLM_SKIP, VLLM_OPTIONS),
    "fp8": ("phead>fp8", "phead>fp8", ()),
    "fp8-e5m2": ("phead>fp8(e5m2)", "phead>fp8(e5m2)", ()),
    "nvfp4": ("group(16)>fp4(nv)", "group(16)>fp4(nv)", ()),
    "mxfp4": ("group(32)>fp4(mx)", "group(32)>fp4(mx)", ()),
}


def family(name: str) -> Family:
    """The :class:`Family` called ``name`` (plain ``(keys, values)`` entries get the defaults)."""
    f = FAMILIES[name]
    return f if isinstance(f, Family) else Family(*f)


# llama.cpp's cache types. Source: ggml-org/llama.cpp, `ggml/src/ggml-quants.c` (formats, whose
# Python reference is gguf-py `gguf/quants.py`) and `src/llama-kv-cache.cpp` (rotation: since
# PR #21038, 2026-04, a quantized K cache is multiplied by the normalised Walsh-Hadamard matrix of
# the largest power-of-two block >= 64 dividing head_dim, V by 64x64 blocks, only when
# head_dim % 64 == 0 (`attn_rot_k/v`, `build_input_k_rot/v_rot`; `llama-graph.cpp` `build_attn`
# rotates k_cur and v_cur before storing them); LLAMA_ATTN_ROT_DISABLE=1 turns it off).
# kvq's `rot(ggml)` is that rule at every head_dim (plain q4_0 where llama.cpp does not rotate).
GGML_ROT_KEYS, GGML_ROT_VALUES = "rot(ggml)>{q}", "rot(ggml,block=64)>{q}"
GGML: dict[str, str] = {
    "q4_0": "llama.cpp `-ctk q4_0 -ctv q4_0`: blocks of 32, fp16 scale, 16 levels (4.5 bits)",
    "q4_1": "llama.cpp `-ctk q4_1 -ctv q4_1`: blocks of 32, fp16 scale and min (5.0 bits)",
    "q8_0": "llama.cpp `-ctk q8_0 -ctv q8_0`: blocks of 32, fp16 scale, int8 (8.5 bits)",
}



def make_preset(name: str, keys: str | list, values: str | list,
                skip: tuple[int, ...] = (), **options) -> KVConfig:
    """A named KVConfig; ``options`` are further KVConfig fields (``key_rope``, ``sinks``)."""
    return KVConfig(name=name, keys=Pipeline.parse(keys), values=Pipeline.parse(values),
                    skip=skip, **options)


def builtin_presets() -> dict[str, partial]:
    """name -> factory returning the KVConfig."""
    out = {name: partial(make_preset, name, *spec[:3], **(spec[3] if len(spec) > 3 else {}))
           for name, spec in FIXED.items()}
    for fname in FAMILIES:
        f = family(fname)
        for b in f.bits:
            name = f"{fname}{b}"
            out[name] = partial(make_preset, name, f.keys.format(b=b), f.values.format(b=b),
                                f.skip, **f.options)
    for q, doc in GGML.items():
        # a step list, not the string: a lone name in a spec string would resolve to this preset
        out[q] = _documented(partial(make_preset, q, [q], [q]), doc + ", no rotation "
                             "(llama.cpp before 2026-04 or LLAMA_ATTN_ROT_DISABLE=1)")
        rotated = partial(make_preset, f"{q}-rot", GGML_ROT_KEYS.format(q=q),
                          GGML_ROT_VALUES.format(q=q))
        out[f"{q}-rot"] = _documented(rotated, doc + ", with llama.cpp's automatic Hadamard "
                                      "rotation (when 64 divides head_dim; K: largest power-of-"
                                      "two block, V: blocks of 64)")
    return out


def _documented(factory: partial, doc: str) -> partial:
    factory.__doc__ = doc
    return factory


def presets() -> dict[str, KVConfig]:
    """Every registered preset (built-in and from plugins), built."""
    from kvq.registry import PRESETS

    return {e.name: factory() for e, factory in PRESETS.loaded()}


def with_bits(name: str, bits: int) -> str:
    """The same preset family at another bit width: ``with_bits("naive4", 3) == "naive3"``."""
    from kvq.errors import SpecError

    fname = name.rstrip("0123456789")
    if fname not in FAMILIES:
        raise SpecError(f"{name!r} is not a preset family with bit variants",
                        suggestion="families: " + ", ".join(FAMILIES))
    widths = family(fname).bits
    if bits not in widths:
        raise SpecError(f"preset family {fname!r} has no {bits}-bit variant",
                        suggestion="its bit widths: " + ", ".join(map(str, widths)))
    return f"{fname}{bits}"
