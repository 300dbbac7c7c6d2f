"""Turn ``--pipelines`` and ``--bits`` into the labelled K/V configurations a comparison runs.

A name is a preset (``naive4``), an inline spec (``'nsep>pchan>int4'``) or a YAML/JSON file.
With bit widths, each entry is taken at every width: presets by family (``naive4`` ->
``naive3``), specs and files by rewriting every ``int<b>`` and ``lloyd<b>`` quantizer. The
``fp16`` reference (no quantization) is always run first, once, as the baseline for ΔPPL.
A preset outside the families (``q4_0``, ``fp8``) and a spec without ``int<b>`` or ``lloyd<b>``
have a fixed width: they run once.
"""

from __future__ import annotations

import re

import kvq
from kvq.errors import KVQError
from kvq.eval.errors import EvalError
from kvq.kvconfig import KVConfig
from kvq.presets import FAMILIES, with_bits
from kvq.registry import PRESETS

BASELINE = "fp16"
DEFAULT_FAMILIES = ("naive", "nsep-pchan", "kivi", "quanto", "quarot")
DEFAULT_BITS = (4, 3)
_INT = re.compile(r"\b(int|lloyd)[2348]\b")


def expand(names: list[str], bits: list[int] | None) -> dict[str, KVConfig]:
    """``{label: KVConfig}``, baseline first, in the order given (bits inner)."""
    out = {BASELINE: kvq.kv(BASELINE)}
    for name in names:
        for b in bits or [None]:
            label, cfg = _one(name, b)
            out.setdefault(label, cfg)
    return out


def default_names(bits: list[int] | None) -> list[str]:
    """The default pipelines: one preset per default family (bits are applied by :func:`expand`)."""
    return [f"{family}{(bits or [4])[0]}" for family in DEFAULT_FAMILIES]


def _one(name: str, bits: int | None) -> tuple[str, KVConfig]:
    name = name.strip()
    if name == BASELINE:
        return BASELINE, kvq.kv(BASELINE)
    family = name.rstrip("0123456789")
    try:
        if family in FAMILIES and family != name:
            preset = with_bits(name, bits) if bits else name
            return preset, kvq.kv(preset)
        if name in PRESETS:  # a one-off preset (q4_0, q8_0-rot): its own width, run once
            return name, kvq.kv(name)
        cfg = kvq.kv(name)
        if bits is None:
            return cfg.label, cfg
        if any(getattr(s, "source", None) for p in cfg.pipelines() for s in p.steps):
            raise EvalError(f"pipeline {name!r} has steps calibrated at one bit width (nuq, "
                            "alloc); leave out --bits, or calibrate at each width")
        data = _rewrite(cfg.to_dict(), bits)
        if data == cfg.to_dict():  # no int<b> in it (q4_0, fp8, ...): its own width, run once
            return cfg.label, cfg
        data.pop("name", None)
        cfg = KVConfig.from_dict(data, source=name)
        return f"{cfg.label}", cfg
    except KVQError as err:
        raise EvalError(f"pipeline {name!r}: {err}") from None


def _rewrite(data, bits: int):
    if isinstance(data, str):
        return _INT.sub(lambda m: f"{m.group(1)}{bits}", data)
    if isinstance(data, dict):
        return {k: _rewrite(v, bits) for k, v in data.items()}
    return data
