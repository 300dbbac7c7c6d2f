"""Which pipelines the packed-K/V decode attention reads directly (the rest use the general path).

The fast decode attention (:mod:`kvq.hf.attention`) does not call ``Pipeline.dequantize``: it
unpacks codes chunk by chunk, decodes them in a scratch buffer (the quantizer's affine map or
level tables) and folds the transforms into the query and the output. So it only covers steps
whose read it knows, listed in :data:`FAST_READ` by **exact class**: a plugin subclass of a
covered step (which may override ``dequantize``) is not covered. Anything else (a quantizer or
transform added later, a plugin step, a step order the algebra does not fold) makes
:func:`fast_path_reason` return why, and the cache keeps the general path, which dequantizes
with the pipeline itself.
"""

from __future__ import annotations

from kvq.granularity import Group, PerChannel, PerToken
from kvq.quantizers import IntQuantizer, NoQuantizer
from kvq.quantizers.alloc import Alloc
from kvq.quantizers.nuq import Nuq
from kvq.transforms import NormSeparation, Rotation
from kvq.transforms.klt import KLT
from kvq.transforms.sparse import Sparse

#: step class -> how the fast read handles it
FAST_READ: dict[type, str] = {
    IntQuantizer: "codes unpacked to fp32, then the quantizer's own affine map (scale, zero)",
    NoQuantizer: "codes are the stored K/V themselves",
    Nuq: "codes unpacked, looked up in the level table (static scales folded into it), then "
         "the min-max affine map per group",
    Alloc: "the variable-width stream unpacked per channel (16-bit windows, shift, mask) and "
           "looked up in each channel's level table",
    PerToken: "scales per token (the quantizer's granularity view)",
    PerChannel: "scales per channel per block (the quantizer's granularity view)",
    Group: "scales per channel or token group (the quantizer's granularity view)",
    NormSeparation: "per-token factor norm / ||direction|| folded into scores and value weights",
    Rotation: "orthonormal matrix folded into the query (keys) and the output (values)",
    KLT: "per-head basis folded into the query and the output; U.T @ mean folded into the "
         "decoded coordinates",
    Sparse: "exact outliers scattered over the decoded chunk (first step, nothing folded after)",
}

#: steps that are folded (a per-token factor or a matrix): a sparse step cannot precede them
FOLDED = (NormSeparation, Rotation, KLT)

#: code widths whose bit-packing the fast read unpacks
FAST_BITS = (2, 3, 4, 8, 16)

#: a klt basis must be orthonormal to fp32 rounding for the folds (its check allows 1e-3)
ORTHONORMAL_TOL = 1e-5


def fast_path_reason(pipeline) -> str | None:
    """Why the fast decode attention cannot read ``pipeline`` (a :class:`kvq.Pipeline`); None
    when it can."""
    steps = pipeline.steps
    for i, step in enumerate(steps):
        if type(step) not in FAST_READ:
            covered = sorted(c.__name__ for c in FAST_READ)
            return (f"step {i} {step.to_spec()!r} ({type(step).__name__}) has no fast read; fast "
                    f"reads exist for {covered}")
    if pipeline.bits not in FAST_BITS:
        return f"{pipeline.bits}-bit codes have no fast unpacking (have {FAST_BITS})"
    kinds = [type(t) for t in pipeline.transforms]
    if kinds.count(NormSeparation) > 1:
        return "more than one per-token factor step (nsep)"
    if Sparse in kinds:
        if kinds.count(Sparse) > 1 or kinds[0] is not Sparse:
            return "sparse must be the first step, and only one (its outliers overwrite the result)"
        if any(k in FOLDED for k in kinds):
            return "sparse before nsep, rot or klt: outliers cannot be scattered over a folded read"
    if NormSeparation in kinds and KLT in kinds[:kinds.index(NormSeparation)]:
        return "klt before nsep: the mean would be added after the per-token factor"
    for t in pipeline.transforms:
        if type(t) is KLT:
            err = _orthonormal_error(t)
            if err > ORTHONORMAL_TOL:
                return (f"the klt basis in {t.source!r} is orthonormal only to {err:.1e}; the "
                        f"fast read folds it as an orthonormal matrix (needs {ORTHONORMAL_TOL})")
    return None


def fast_path_reason_kv(keys, values) -> str | None:
    """:func:`fast_path_reason` for a (keys, values) pipeline pair, naming the stream."""
    for role, p in (("keys", keys), ("values", values)):
        why = fast_path_reason(p)
        if why:
            return f"{role} pipeline {p.to_spec()!r}: {why}"
    return None


def _orthonormal_error(klt) -> float:
    import torch

    basis = klt.tensor("klt.basis").double()
    eye = torch.eye(basis.shape[-1], dtype=basis.dtype)
    return float((basis.transpose(1, 2) @ basis - eye).abs().max())
