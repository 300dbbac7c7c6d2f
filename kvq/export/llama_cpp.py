"""llama.cpp: ``-ctk`` / ``-ctv`` cache types and its automatic Hadamard rotation.

llama.cpp has one K type and one V type for all layers (``--cache-type-k/-v``). Since PR #21038
(2026-04) it rotates a quantized K (blocks of the largest power of two >= 64 dividing head_dim)
and a quantized V (blocks of 64) when head_dim % 64 == 0; ``LLAMA_ATTN_ROT_DISABLE=1`` turns it
off for both (docs/llama-cpp.md, kvq's ``q4_0-rot`` presets). A quantized V cache needs flash
attention (``-fa on``).

Cache types kvq has bit-exact (``kvq/quantizers/ggml.py``): q4_0, q4_1, q8_0; f16 is kvq's
``none``. llama.cpp's q5_0, q5_1, iq4_nl and bf16 have no kvq step yet, so nothing maps to them.
"""

from __future__ import annotations

import json
import shlex

from kvq.export import base
from kvq.export.base import Exported, Model, Refused
from kvq.kvconfig import KVConfig
from kvq.pipeline import Pipeline

ENGINE = "llama.cpp"

#: llama.cpp cache type -> the kvq quantizer spec storing it ("none": unquantized)
TYPES: dict[str, str] = {"q4_0": "q4_0", "q4_1": "q4_1", "q8_0": "q8_0", "f16": "none"}
#: cache types llama.cpp has and kvq does not (refused by name; the docs table lists them)
NOT_IN_KVQ = ("q5_0", "q5_1", "iq4_nl", "bf16")
ROT_ENV = "LLAMA_ATTN_ROT_DISABLE"


def key_block(head_dim: int) -> int | None:
    """llama.cpp's K rotation block: the largest power of two >= 64 dividing head_dim."""
    if head_dim % 64:
        return None
    b = 64
    while head_dim % (2 * b) == 0:
        b *= 2
    return b


def specs(ctype: str, role: str, head_dim: int, rotated: bool) -> list[str]:
    """Canonical kvq specs of ``ctype`` as llama.cpp stores ``role`` ("keys"/"values"), the
    preferred one first (kvq's ``rot(ggml)``, which applies llama.cpp's rule itself)."""
    q = TYPES[ctype]
    plain = Pipeline.parse([q]).to_spec()
    ggml = "rot(ggml)" if role == "keys" else "rot(ggml,block=64)"
    if q == "none":
        return [plain]
    if not rotated:  # llama.cpp's rule rotates nothing unless 64 divides head_dim
        extra = [f"{ggml}>{q}"] if key_block(head_dim) is None else []
        return [plain] + [Pipeline.parse(f).to_spec() for f in extra]
    block = (key_block(head_dim) or head_dim) if role == "keys" else 64
    forms = [f"{ggml}>{q}", f"rot(hadamard,block={block})>{q}"]
    if block == head_dim:
        forms.append(f"rot(hadamard)>{q}")
    return [Pipeline.parse(f).to_spec() for f in forms]


def config(ctk: str, ctv: str, head_dim: int, rotated: bool | None = None) -> KVConfig:
    """The kvq config llama.cpp runs for ``-ctk ctk -ctv ctv`` (``rotated``: default, as
    llama.cpp decides from head_dim)."""
    rot = key_block(head_dim) is not None if rotated is None else rotated

    def one(ctype: str, role: str) -> str:
        return specs(ctype, role, head_dim, rot)[0]

    name = f"llama.cpp-ctk-{ctk}-ctv-{ctv}" + ("" if rot or ctk == ctv == "f16" else "-norot")
    return KVConfig(name=name, keys=Pipeline.parse(one(ctk, "keys")),
                    values=Pipeline.parse(one(ctv, "values")))


def _match(p: Pipeline, role: str, head_dim: int) -> tuple[str, bool] | None:
    """(cache type, rotated) of a pipeline, or None."""
    spec = p.to_spec()
    for ctype in TYPES:
        for rotated in (False, True):
            if spec in specs(ctype, role, head_dim, rotated):
                return ctype, rotated and TYPES[ctype] != "none"
    return None


def _closest(cfg: KVConfig, model: Model) -> tuple[KVConfig, str]:
    layers = [cfg.for_layer(i, model.num_layers) for i in range(model.num_layers)]
    cost = {t: Pipeline.parse([TYPES[t]]).bits_per_element(model.head_dim, base.BLOCK)
            for t in TYPES}
    mean = [sum(kv[r].bits_per_element(model.head_dim, base.BLOCK) for kv in layers) /
            len(layers) for r in (0, 1)]
    ctk, ctv = (base.closest(m, cost) for m in mean)
    out = config(ctk, ctv, model.head_dim)
    return out, f"-ctk {ctk} -ctv {ctv} ({base.bits(out, model):.2f} bits/element)"


def refuse(reason: str, cfg: KVConfig, model: Model) -> Refused:
    closest, text = _closest(cfg, model)
    return Refused(ENGINE, reason, closest, text)


def export(cfg: KVConfig, model: Model) -> Exported:
    """The llama.cpp options running ``cfg`` exactly, or :class:`Refused`."""
    why = base.common_refusal("llama.cpp", cfg)
    if why:
        raise refuse(why, cfg, model)
    layers = base.per_layer(cfg, model)
    if len({(k.to_spec(), v.to_spec()) for k, v in layers}) > 1:
        raise refuse("llama.cpp has no per-layer K/V types (one -ctk and one -ctv for all "
                     "layers); this config varies by layer", cfg, model)
    (keys, values), hd = layers[0], model.head_dim
    found = {}
    for role, p in (("keys", keys), ("values", values)):
        m = _match(p, role, hd)
        if m is None:
            raise refuse(f"llama.cpp has no cache type for {role} {p.to_spec()[:60]!r} (it has "
                         f"{', '.join(TYPES)} in kvq; {', '.join(NOT_IN_KVQ)} have no kvq "
                         "step)", cfg, model)
        found[role] = m
    (ctk, rk), (ctv, rv) = found["keys"], found["values"]
    auto = key_block(hd) is not None
    quantized = [t != "f16" for t in (ctk, ctv)]
    rots = [r for r, q in zip((rk, rv), quantized) if q]
    if any(rots) and not auto:
        raise refuse(f"llama.cpp rotates K/V only when head_dim % 64 == 0 (head_dim {hd}); "
                     "this config rotates them", cfg, model)
    if auto and any(rots) and not all(rots):
        raise refuse("llama.cpp rotates every quantized K/V cache or none "
                     f"({ROT_ENV}=1); this config rotates only the keys or only the values",
                     cfg, model)
    env = {ROT_ENV: "1"} if auto and rots and not any(rots) else {}
    notes = []
    if env:
        notes.append(f"{ROT_ENV}=1: this config quantizes without llama.cpp's Hadamard rotation")
    elif any(rots):
        notes.append("llama.cpp applies the Hadamard rotation itself (as this config does)")
    if "f16" in (ctk, ctv):
        notes.append("f16: llama.cpp stores those K/V at fp16; kvq's none keeps the model's "
                     "dtype")
    args = {"cache-type-k": ctk, "cache-type-v": ctv}
    if ctv != "f16":
        args["flash-attn"] = "on"
        notes.append("a quantized V cache needs flash attention (-fa on)")
    cmd = ["llama-server", "-m", f"{model.name}.gguf", "-ctk", ctk, "-ctv", ctv]
    cmd += ["-fa", "on"] if "flash-attn" in args else []
    command = " ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") + \
        shlex.join(cmd)
    data = {"options": args, "env": env}
    return Exported(ENGINE, cfg, command=command, engine_args=data, notes=notes,
                    files={"llama_cpp_args.json": json.dumps(data, indent=2) + "\n",
                           "llama_server.sh": f"#!/bin/sh\n{command} \"$@\"\n"})
