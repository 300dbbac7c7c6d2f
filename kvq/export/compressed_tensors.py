"""compressed-tensors / llm-compressor: a checkpoint with ``kv_cache_scheme`` and KV scales.

vLLM loads an FP8 KV cache from a compressed-tensors checkpoint: ``config.json``'s
``quantization_config.kv_cache_scheme`` (8-bit float, symmetric, static; ``strategy`` ``tensor``
or ``attn_head``) and per attention module ``<prefix>.k_scale`` / ``<prefix>.v_scale``
((1,) per tensor, (kv_heads, 1, 1) per head, as llm-compressor 0.14 writes them). kvq maps
``fp8(e4m3,static,source=...)`` on every layer's K and V (``kvq calibrate --recipe fp8-tensor``
or ``fp8-head``) exactly: the checkpoint carries the very scales kvq scored.

The export is the model directory's files (weights copied unchanged), ``config.json`` with the
``quantization_config`` added, ``kv_scales.safetensors`` with the scales, and a
``model.safetensors.index.json`` naming both (vLLM and transformers load the shards it lists).
"""

from __future__ import annotations

import json
import re

import torch

from kvq.export import base
from kvq.export.base import Exported, Model, Refused
from kvq.kvconfig import KVConfig

ENGINE = "compressed-tensors"
SCALES_FILE = "kv_scales.safetensors"
INDEX = "model.safetensors.index.json"
#: the compressed-tensors format version whose schema this writes (parsed by 0.20 in the tests)
FORMAT_VERSION = "0.20.1"
STRATEGY = {"tensor": "tensor", "head": "attn_head"}
_HOW = "kvq calibrate --recipe fp8-tensor (or fp8-head)"


def kv_cache_scheme(strategy: str) -> dict:
    """The ``kv_cache_scheme`` llm-compressor writes for static symmetric FP8."""
    return {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None,
            "num_bits": 8, "observer": None, "observer_kwargs": {}, "scale_dtype": None,
            "strategy": strategy, "symmetric": True, "type": "float", "zp_dtype": None}


def quantization_config(strategy: str) -> dict:
    return {"config_groups": {}, "format": "dense", "global_compression_ratio": None,
            "ignore": [], "kv_cache_scheme": kv_cache_scheme(strategy),
            "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "sparsity_config": {}, "transform_config": {}, "version": FORMAT_VERSION}


def _refuse(reason: str) -> Refused:
    return Refused(ENGINE, reason + f"; fit static FP8 scales with `{_HOW}`")


def scales(cfg: KVConfig, model: Model) -> tuple[str, dict[tuple[int, str], torch.Tensor]]:
    """(strategy, {(layer, "k"|"v"): fp32 scale}) of a static-FP8 config, or :class:`Refused`."""
    why = base.common_refusal("compressed-tensors", cfg)
    if why:
        raise _refuse(why)
    out, kinds = {}, set()
    for i, (k, v) in enumerate(base.per_layer(cfg, model)):
        for role, p in (("k", k), ("v", v)):
            q = p.quantizer
            if p.is_identity:
                raise _refuse(f"compressed-tensors has one kv_cache_scheme for every attention "
                              f"layer; this config leaves layer {i} unquantized")
            if q.type != "fp8" or q.scale != "static" or q.format != "e4m3" or p.transforms:
                raise _refuse(f"vLLM loads static FP8 E4M3 KV scales from compressed-tensors; "
                              f"layer {i} {'keys' if role == 'k' else 'values'} are "
                              f"{p.to_spec()[:60]!r}")
            s = q.static_scale()
            kinds.add("tensor" if s.dim() == 0 else "head")
            if s.dim() == 1 and s.numel() != model.kv_heads:
                raise _refuse(f"layer {i} has {s.numel()} head scales for {model.kv_heads} kv "
                              "heads (calibrated for another model?)")
            out[i, role] = s
    if len(kinds) > 1:
        raise _refuse("compressed-tensors has one scale strategy for all layers; this config "
                      "mixes per-tensor and per-head scales")
    return STRATEGY[kinds.pop()], out


def attention_prefixes(model: Model) -> dict[int, str]:
    """layer -> attention module name, from the ``*.k_proj.weight`` tensors of the checkpoint."""
    from safetensors import safe_open

    names: list[str] = []
    if model.path is None:
        raise Refused(ENGINE, "compressed-tensors export needs the model directory (--model)")
    for f in sorted(model.path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names += list(st.keys())
    out = {}
    for n in names:
        m = re.fullmatch(r"(.*\.layers\.(\d+)\.[^.]+)\.k_proj\.weight", n)
        if m:
            out[int(m.group(2))] = m.group(1)
    if sorted(out) != list(range(model.num_layers)):
        raise Refused(ENGINE, f"cannot find one <prefix>.k_proj.weight per layer in "
                      f"{str(model.path)[:120]!r} (found {len(out)} of {model.num_layers}); "
                      "kvq writes k_scale/v_scale beside k_proj")
    return out


def export(cfg: KVConfig, model: Model) -> Exported:
    strategy, found = scales(cfg, model)
    prefixes = attention_prefixes(model)
    tensors = {}
    for (i, role), s in sorted(found.items()):
        shape = (1,) if strategy == "tensor" else (model.kv_heads, 1, 1)
        tensors[f"{prefixes[i]}.{role}_scale"] = s.reshape(shape).contiguous()
    from safetensors.torch import save

    files: dict[str, str | bytes] = {SCALES_FILE: save(tensors, metadata={"format": "pt"})}
    config = dict(model.config or {})
    config["quantization_config"] = quantization_config(strategy)
    files["config.json"] = json.dumps(config, indent=2) + "\n"
    copies, index = _model_files(model)
    index["weight_map"].update({k: SCALES_FILE for k in tensors})
    files[INDEX] = json.dumps(index, indent=2) + "\n"
    notes = [f"kv_cache_scheme strategy {strategy}; serve with vllm serve DIR "
             "(it reads kv_cache_scheme and the scales; --kv-cache-dtype fp8)"]
    return Exported(ENGINE, cfg, command="vllm serve OUT --kv-cache-dtype fp8",
                    engine_args={"kv_cache_scheme": kv_cache_scheme(strategy)}, files=files,
                    copies=copies, notes=notes)


def _model_files(model: Model) -> tuple[dict, dict]:
    """(files to copy, the weight index to extend) of the model directory."""
    from safetensors import safe_open

    copies = {p.name: p for p in sorted(model.path.iterdir())
              if p.is_file() and not p.name.startswith(".") and p.name not in
              ("config.json", INDEX, SCALES_FILE)}
    if (model.path / INDEX).is_file():
        index = json.loads((model.path / INDEX).read_text(encoding="utf-8"))
    else:
        weight_map = {}
        for f in sorted(model.path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                weight_map |= dict.fromkeys(st.keys(), f.name)
        index = {"metadata": {}, "weight_map": weight_map}
    return copies, index
