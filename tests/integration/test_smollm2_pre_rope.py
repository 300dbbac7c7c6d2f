"""Pre-RoPE keys and sinks on the real SmolLM2-135M-Instruct (slow; skips without the model)."""

from __future__ import annotations

import pytest
import torch
from test_smollm2_cache import nll, smollm2  # noqa: F401  (fixture)
from transformers import DynamicCache

import kvq
from kvq.hf import KVQCache

pytestmark = pytest.mark.slow


def cfg(rope: str, keys: str, sinks: int = 0) -> kvq.KVConfig:
    return kvq.KVConfig.from_dict({"keys": {"rope": rope, "pipeline": keys}, "values": "fp16",
                                   "sinks": sinks})


def test_identity_pre_rope_with_sinks_generates_like_dynamic_cache(smollm2):  # noqa: F811
    model, ids = smollm2
    kw = dict(max_new_tokens=8, do_sample=False)
    ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
    cache = KVQCache(cfg("pre", "fp16", sinks=1), model, residual=0)
    got = model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(got, ref)


def test_a_sink_helps_pre_rope_per_channel_keys(smollm2):  # noqa: F811
    """Per-channel int3 keys (values exact) before RoPE: on this 120-token text the first token's
    keys set the first block's channel scales; kept exact as a sink, the loss drops."""
    model, ids = smollm2
    exact = nll(model, ids)
    pre = nll(model, ids, KVQCache(cfg("pre", "pchan>int3"), model))
    pre_sink = nll(model, ids, KVQCache(cfg("pre", "pchan>int3", sinks=1), model))
    assert exact < pre_sink < pre - 0.2, (exact, pre_sink, pre)
