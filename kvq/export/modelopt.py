"""ModelOpt / TensorRT-LLM: ``hf_quant_config.json`` with ``kv_cache_quant_algo`` and a layer map.

ModelOpt 0.47 exports KV-cache formats in ``hf_quant_config.json`` (``quantization.
kv_cache_quant_algo``: ``FP8`` or ``NVFP4``) and, schema version 1, a per-layer map
``kv_cache_quantized_layers`` (``{"model.layers.0.self_attn": {"quant_algo": "FP8"}}``; layers
left out stay unquantized), which vLLM's ModelOpt reader (PR #52813 / #56116) turns into a KV
dtype per attention layer: full FP8 K/V or full NVFP4 K/V, never FP8 K with NVFP4 V. The scales
are ``<attn>.k_proj.k_scale`` / ``<attn>.v_proj.v_scale`` (ModelOpt's names): FP8 ``amax /
448``, NVFP4 the second-level ``amax / (6 * 448)``.

kvq maps, per layer, ``fp8(e4m3,static,source=...)`` per tensor (``kvq calibrate --recipe
fp8-tensor`` / ``fp8-tensor-max``), ``fp8(e4m3,none)`` (scale 1.0) and
``group(16)>fp4(nv,scale=static,source=...)`` (``--recipe nvfp4``) on K and V alike. ModelOpt
itself clamps FP8 KV scales to >= 1.0 by default (``clamp_fp8_scales``); kvq writes the scales
it scored.
"""

from __future__ import annotations

import json

import torch

from kvq.export import base
from kvq.export.base import Exported, Model, Refused
from kvq.export.compressed_tensors import INDEX, SCALES_FILE, _model_files, attention_prefixes
from kvq.kvconfig import KVConfig
from kvq.pipeline import Pipeline

ENGINE = "modelopt"
CONFIG_FILE = "hf_quant_config.json"
MODELOPT_VERSION = "0.47.0"  # the hf_quant_config schema written (kv_cache_schema_version 1)
_HOW = "kvq calibrate --recipe fp8-tensor or --recipe nvfp4"


def algo(p: Pipeline) -> tuple[str, torch.Tensor] | None:
    """("FP8" | "NVFP4", fp32 scalar scale) of a pipeline ModelOpt stores, else None."""
    q, grans = p.quantizer, [s for s in p.steps if s.role == "granularity"]
    if p.transforms:
        return None
    if q.type == "fp8" and q.format == "e4m3" and not grans and q.scale in ("none", "static"):
        s = torch.tensor(1.0) if q.scale == "none" else q.static_scale()
        return ("FP8", s) if s.dim() == 0 else None
    if q.type == "fp4" and q.block == "nv" and q.scale == "static" and \
            p.granularity.to_spec() == "group(16)":
        s = q.static_scale()
        return ("NVFP4", s) if s.dim() == 0 else None
    return None


def export(cfg: KVConfig, model: Model) -> Exported:
    why = base.common_refusal("ModelOpt", cfg)
    if why:
        raise Refused(ENGINE, why)
    layers = base.per_layer(cfg, model)
    algos: dict[int, str] = {}
    scales: dict[tuple[int, str], torch.Tensor] = {}
    for i, (k, v) in enumerate(layers):
        if base.unquantized((k, v)):
            continue
        ak, av = algo(k), algo(v)
        for role, p, a in (("keys", k, ak), ("values", v, av)):
            if a is None:
                raise Refused(ENGINE, f"ModelOpt's KV layer map has per-tensor FP8 E4M3 and "
                              f"NVFP4 with static scales; layer {i} {role} are "
                              f"{p.to_spec()[:60]!r}; fit them with `{_HOW}`")
        if ak[0] != av[0]:
            raise Refused(ENGINE, f"layer {i} has {ak[0]} keys and {av[0]} values; vLLM's "
                          "ModelOpt reader takes full FP8 or full NVFP4 K/V per layer")
        algos[i] = ak[0]
        scales[i, "k"], scales[i, "v"] = ak[1], av[1]
    if not algos:
        raise Refused(ENGINE, "this config quantizes no layer; there is nothing to export")
    prefixes = attention_prefixes(model)
    kinds = set(algos.values())
    layer_map = {prefixes[i]: {"quant_algo": a} for i, a in sorted(algos.items())}
    quant = {"quant_algo": "MIXED_PRECISION", "quantized_layers": {},
             "kv_cache_quant_algo": kinds.pop() if len(kinds) == 1 else "MIXED_PRECISION",
             "kv_cache_quantized_layers": layer_map, "kv_cache_schema_version": 1}
    hf_quant = {"producer": {"name": "modelopt", "version": MODELOPT_VERSION},
                "quantization": quant,
                "kvq": "written by kvq export from a kvq config (see kvq_config.yaml)"}
    tensors = {f"{prefixes[i]}.{r}_proj.{r}_scale": s.float().reshape(())
               for (i, r), s in sorted(scales.items())}
    from safetensors.torch import save

    files: dict[str, str | bytes] = {CONFIG_FILE: json.dumps(hf_quant, indent=2) + "\n",
                                     SCALES_FILE: save(tensors, metadata={"format": "pt"})}
    copies, index = _model_files(model)
    if model.config is not None:
        files["config.json"] = json.dumps(model.config, indent=2) + "\n"
        copies.pop("config.json", None)
    index["weight_map"].update({k: SCALES_FILE for k in tensors})
    files[INDEX] = json.dumps(index, indent=2) + "\n"
    skipped = [i for i in range(model.num_layers) if i not in algos]
    notes = [f"kv_cache_quant_algo {quant['kv_cache_quant_algo']}, {len(layer_map)} layers in "
             "kv_cache_quantized_layers" + (f"; layers {skipped} unquantized" if skipped else "")]
    return Exported(ENGINE, cfg, command="vllm serve OUT   # or TensorRT-LLM from OUT",
                    engine_args={"hf_quant_config": hf_quant}, files=files, copies=copies,
                    notes=notes)
