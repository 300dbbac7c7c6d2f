"""Which pipelines the packed-K/V decode attention reads directly (the rest use the general path).

The fast decode attention (:mod:`kvq.hf.attention`) does not call ``Pipeline.dequantize``: it
unpacks codes chunk by chunk, applies the quantizer's affine map in a scratch buffer and folds the
transforms into the query and the output. So it only covers steps whose read it knows, listed in
:data:`FAST_READ` by step ``type``, and only kvq's own class of that type. Anything else (a
quantizer or transform added later, a plugin step, a subclass of a built-in that keeps its
``type``) makes :func:`fast_path_reason` return why, and the cache keeps the general path, which
dequantizes with the pipeline itself.
"""

from __future__ import annotations

#: step type -> how the fast read handles it
FAST_READ: dict[str, str] = {
    "int": "codes: unpacked to fp32, then the quantizer's own affine dequantize (scale, zero)",
    "none": "codes are the stored K/V themselves",
    "ptok": "scales per token (the quantizer's granularity view)",
    "pchan": "scales per channel per block (the quantizer's granularity view)",
    "group": "scales per channel or token group (the quantizer's granularity view)",
    "nsep": "per-token factor norm / ||direction|| folded into scores and value weights",
    "rot": "orthonormal matrix folded into the query (keys) and the output (values)",
}

#: step types with a per-token factor; the fast read composes at most one of them
TOKEN_FACTOR = ("nsep",)

#: code widths whose bit-packing the fast read unpacks
FAST_BITS = (2, 3, 4, 8, 16)


def fast_path_reason(pipeline) -> str | None:
    """Why the fast decode attention cannot read ``pipeline`` (a :class:`kvq.Pipeline`); None
    when it can."""
    for i, step in enumerate(pipeline.steps):
        kind = getattr(step, "type", type(step).__name__)
        if kind not in FAST_READ:
            return (f"step {i} {step.to_spec()!r} (type {kind!r}) has no fast read; fast reads "
                    f"exist for {sorted(FAST_READ)}")
        if type(step) is not _builtin_class(kind):  # a subclass keeping the type: its own math
            return (f"step {i} {step.to_spec()!r} is a {type(step).__name__}, not kvq's own "
                    f"{kind!r} step; the fast read knows only the built-in classes")
    if pipeline.bits not in FAST_BITS:
        return f"{pipeline.bits}-bit codes have no fast unpacking (have {FAST_BITS})"
    factors = [t.to_spec() for t in pipeline.transforms if t.type in TOKEN_FACTOR]
    if len(factors) > 1:
        return f"more than one per-token factor step ({', '.join(factors)})"
    return None


def _builtin_class(kind: str):
    """The class kvq itself registers for step type ``kind`` (None if a plugin owns it)."""
    from kvq.errors import KVQError
    from kvq.registry import STEPS

    try:
        entry = STEPS.entry(kind)
        return entry.load() if entry.source == "kvq" else None
    except KVQError:
        return None


def fast_path_reason_kv(keys, values) -> str | None:
    """:func:`fast_path_reason` for a (keys, values) pipeline pair, naming the stream."""
    for role, p in (("keys", keys), ("values", values)):
        why = fast_path_reason(p)
        if why:
            return f"{role} pipeline {p.to_spec()!r}: {why}"
    return None
