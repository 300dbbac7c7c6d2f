"""llama.cpp mapping: -ctk/-ctv for every kvq cache type, the rotation rule, refusals."""

from __future__ import annotations

import dataclasses

import pytest

import kvq
from kvq.export import Refused, export
from kvq.export import llama_cpp as lc


@pytest.mark.parametrize("q", ["q4_0", "q4_1", "q8_0"])
def test_rotated_presets_run_by_default(model, q):
    res = export(f"{q}-rot", "llama.cpp", model=model)
    assert res.exact and res.engine_args == {
        "options": {"cache-type-k": q, "cache-type-v": q, "flash-attn": "on"}, "env": {}}
    assert res.command == f"llama-server -m tiny.gguf -ctk {q} -ctv {q} -fa on"


@pytest.mark.parametrize("q", ["q4_0", "q4_1", "q8_0"])
def test_plain_presets_disable_the_rotation(model, q):
    res = export(q, "llama.cpp", model=model)
    assert res.exact and res.engine_args["env"] == {"LLAMA_ATTN_ROT_DISABLE": "1"}
    assert res.command.startswith("LLAMA_ATTN_ROT_DISABLE=1 llama-server")


def test_head_dim_without_rotation(model):
    small = dataclasses.replace(model, head_dim=32)  # 32 % 64 != 0: llama.cpp never rotates
    res = export("q4_0", "llama.cpp", model=small)
    assert res.exact and res.engine_args["env"] == {}
    with pytest.raises(Refused, match="only when head_dim % 64 == 0"):
        export({"keys": "rot(hadamard)>q4_0", "values": "q4_0"}, "llama.cpp", model=small)


def test_mixed_k_and_v_types(model):
    cfg = {"keys": "rot(hadamard)>q8_0",
           "values": "rot(hadamard,block=64)>q4_0"}
    res = export(cfg, "llama.cpp", model=model)
    assert res.engine_args["options"] == {"cache-type-k": "q8_0", "cache-type-v": "q4_0",
                                          "flash-attn": "on"}


def test_quantized_keys_f16_values(model):
    res = export({"keys": "rot(hadamard)>q8_0", "values": "none"}, "llama.cpp", model=model)
    assert res.engine_args["options"] == {"cache-type-k": "q8_0", "cache-type-v": "f16"}
    assert "-fa" not in res.command


def test_key_block_for_other_head_dims():
    assert [lc.key_block(d) for d in (64, 96, 128, 192, 256)] == [64, None, 128, 64, 256]
    assert "rot(hadamard,block=64)>q4_0" in lc.specs("q4_0", "keys", 192, True)


def test_unquantized(model):
    res = export("fp16", "llama.cpp", model=model)
    assert res.engine_args["options"] == {"cache-type-k": "f16", "cache-type-v": "f16"}


@pytest.mark.parametrize("config, match", [
    ("turboquant4", "no per-layer K/V types"),
    ({"kv": "q4_0", "skip": [0]}, "no per-layer K/V types"),
    ("naive4", "no cache type for keys 'ptok>int4'"),
    ({"keys": "rot(hadamard)>q4_0", "values": "q4_0"}, "rotates every quantized K/V cache"),
    ({"kv": "q4_0", "sinks": 2}, "no exact sink tokens"),
])
def test_refusals(model, config, match):
    with pytest.raises(Refused, match=match) as err:
        export(config, "llama.cpp", model=model)
    assert "\n" not in str(err.value) and "closest: -ctk" in str(err.value)
    assert export(err.value.closest, "llama.cpp", model=model).exact


def test_closest_chooses_k_and_v_separately(model):
    with pytest.raises(Refused) as err:
        export({"keys": "naive8", "values": "naive4"}, "llama.cpp", model=model)
    assert "-ctk q8_0 -ctv q4_0" in str(err.value)
    assert err.value.closest == lc.config("q8_0", "q4_0", 64)
    assert err.value.closest.keys == kvq.build("rot(ggml)>q8_0")


@pytest.mark.parametrize("head_dim", [96, 160])
def test_rot_presets_at_head_dims_llama_cpp_does_not_rotate(model, head_dim):
    """``q4_0-rot`` follows llama.cpp's rule (rot(ggml) rotates nothing unless 64 | head_dim),
    so it exports exactly to plain -ctk/-ctv, as llama.cpp runs it there."""
    odd = dataclasses.replace(model, head_dim=head_dim)
    res = export("q4_0-rot", "llama.cpp", model=odd)
    assert res.exact
    assert res.engine_args["options"]["cache-type-k"] == "q4_0"
    assert res.engine_args["options"]["cache-type-v"] == "q4_0"
