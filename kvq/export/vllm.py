"""vLLM: ``--kv-cache-dtype`` and ``--kv-cache-dtype-skip-layers`` (vllm 0.33.0).

vLLM runs one KV cache dtype for every attention layer; ``--kv-cache-dtype-skip-layers`` keeps
listed layers at the model dtype (``vllm/model_executor/layers/attention/attention.py``). Its
TurboQuant dtypes always add the first and last 2 layers to that list
(``TurboQuantConfig.get_boundary_skip_layers``, ``vllm/engine/arg_utils.py``). The FP8 dtypes
cast with a per-tensor scale: 1.0 unless the checkpoint carries ``k_scale``/``v_scale`` (kvq's
``fp8(e4m3,none)``; with calibrated scales ``fp8(e4m3,static,source=...)``, served from the
checkpoint ``kvq export --engine compressed-tensors`` writes).

The tables are data: a dtype maps to a kvq preset (by its name in :mod:`kvq.presets`) or spec,
so renaming a preset is a one-line change here.
"""

from __future__ import annotations

import json
import shlex

from kvq.export import base
from kvq.export.base import Exported, Model, Refused
from kvq.kvconfig import KVConfig
from kvq.pipeline import Pipeline

ENGINE = "vllm"

#: --kv-cache-dtype -> the kvq preset storing K/V exactly so (skip: vLLM's boundary layers)
TURBOQUANT: dict[str, str] = {
    "turboquant_k8v4": "turboquant-k8v4",
    "turboquant_4bit_nc": "turboquant4",
    "turboquant_k3v4_nc": "turboquant-k3v4",
    "turboquant_3bit_nc": "turboquant3",
}
#: --kv-cache-dtype -> the fp8 format it casts to (per-tensor scale, 1.0 by default)
FP8: dict[str, str] = {"fp8": "e4m3", "fp8_e5m2": "e5m2"}
#: layers vLLM's TurboQuant keeps unquantized at each end (get_boundary_skip_layers(n=2))
BOUNDARY = 2


def boundary_layers(num_layers: int, n: int = BOUNDARY) -> set[int]:
    """vLLM's ``get_boundary_skip_layers`` for a dense model: the first and last ``n`` layers."""
    n = min(n, num_layers // 2)
    return set(range(n)) | set(range(num_layers - n, num_layers)) if n > 0 else set()


def fp8_format(p: Pipeline) -> tuple[str, str] | None:
    """(format, scale) of a pipeline that is a plain per-tensor fp8 cast (scale ``none`` or
    ``static``), else None."""
    q = p.quantizer
    if q.type != "fp8" or p.transforms or q.scale not in ("none", "static"):
        return None
    if any(s.role == "granularity" for s in p.steps):
        return None
    return q.format, q.scale


def _kind(p: Pipeline) -> tuple | str:
    """What vLLM distinguishes: the spec, or for calibrated fp8 its format (each layer has
    its own scales in the checkpoint)."""
    f = fp8_format(p)
    return ("fp8", *f) if f is not None and f[1] == "static" else p.to_spec()


def candidates(model: Model) -> dict[str, KVConfig]:
    """Every dtype vLLM runs, as the kvq config it stores (uncalibrated fp8: scale 1.0)."""
    from kvq.registry import PRESETS

    out = {d: KVConfig.from_spec(f"fp8({f},none)", name=f"vllm-{d}") for d, f in FP8.items()}
    for dtype, preset in TURBOQUANT.items():
        out[dtype] = PRESETS.get(preset)()
    return out


def _closest(cfg: KVConfig, model: Model) -> tuple[KVConfig, str]:
    cands = candidates(model)
    scored = {d: base.bits(c, model) for d, c in cands.items()}
    d = base.closest(base.bits(cfg, model), scored)
    return cands[d], f"--kv-cache-dtype {d} ({cands[d].label}, {scored[d]:.2f} bits/element)"


def refuse(reason: str, cfg: KVConfig, model: Model) -> Refused:
    closest, text = _closest(cfg, model)
    return Refused(ENGINE, reason, closest, text)


def export(cfg: KVConfig, model: Model) -> Exported:
    """The vLLM arguments running ``cfg`` exactly, or :class:`Refused`."""
    why = base.common_refusal("vLLM", cfg)
    if why:
        raise refuse(why, cfg, model)
    layers = base.per_layer(cfg, model)
    skipped = {i for i, kv in enumerate(layers) if base.unquantized(kv)}
    half = [i for i, (k, v) in enumerate(layers) if k.is_identity != v.is_identity]
    if half:
        raise refuse(f"vLLM quantizes a layer's keys and values together; layer {half[0]} "
                     "quantizes only one of them", cfg, model)
    pairs = {(_kind(k), _kind(v)) for i, (k, v) in enumerate(layers) if i not in skipped}
    if not pairs:
        return _result(cfg, model, "auto", [], ["all layers unquantized: the model dtype"])
    if len(pairs) > 1:
        raise refuse(f"vLLM has one --kv-cache-dtype for all layers; this config uses "
                     f"{len(pairs)} different K/V pipelines", cfg, model)
    keys, values = next(iter(layers[i] for i in range(len(layers)) if i not in skipped))
    tq = _turboquant(keys, values)
    if tq is not None:
        need = boundary_layers(model.num_layers)
        missing = sorted(need - skipped)
        if missing:
            raise refuse(f"vLLM's {tq} always keeps layers {sorted(need)} unquantized; this "
                         f"config quantizes layer {missing[0]}", cfg, model)
        return _result(cfg, model, tq, sorted(skipped - need),
                       [f"vLLM adds layers {sorted(need)} to the skip list itself"])
    fk, fv = fp8_format(keys), fp8_format(values)
    if fk is None or fv is None:
        raise refuse(f"vLLM has no KV cache format for keys {keys.to_spec()[:60]!r}, values "
                     f"{values.to_spec()[:60]!r}", cfg, model)
    if fk[0] != fv[0]:
        raise refuse(f"vLLM has one fp8 format for keys and values; this config uses "
                     f"{fk[0]} keys and {fv[0]} values", cfg, model)
    dtype = next(d for d, f in FP8.items() if f == fk[0])
    notes = []
    if "static" in (fk[1], fv[1]):
        if fk[1] != fv[1]:
            raise refuse("vLLM takes k_scale and v_scale from the same checkpoint; this config "
                         "has calibrated scales for only one of keys and values", cfg, model)
        notes.append("serve the checkpoint `kvq export --engine compressed-tensors` writes: "
                     "its k_scale/v_scale are this config's calibrated scales")
    else:
        notes.append("no k_scale/v_scale in the checkpoint: vLLM casts with scale 1.0, as here")
    return _result(cfg, model, dtype, sorted(skipped), notes)


def _turboquant(keys: Pipeline, values: Pipeline) -> str | None:
    from kvq.registry import PRESETS

    for dtype, preset in TURBOQUANT.items():
        p = PRESETS.get(preset)()
        if (p.keys.to_spec(), p.values.to_spec()) == (keys.to_spec(), values.to_spec()):
            return dtype
    return None


def _result(cfg: KVConfig, model: Model, dtype: str, skip: list[int], notes: list[str]
            ) -> Exported:
    args = {"kv_cache_dtype": dtype}
    if skip:
        args["kv_cache_dtype_skip_layers"] = [str(i) for i in skip]
    cmd = ["vllm", "serve", model.name, "--kv-cache-dtype", dtype]
    if skip:
        cmd += ["--kv-cache-dtype-skip-layers", *args["kv_cache_dtype_skip_layers"]]
    command = shlex.join(cmd)
    return Exported(ENGINE, cfg, command=command, engine_args=args, notes=notes,
                    files={"vllm_engine_args.json": json.dumps(args, indent=2) + "\n",
                           "vllm_serve.sh": f"#!/bin/sh\n{command} \"$@\"\n"})
