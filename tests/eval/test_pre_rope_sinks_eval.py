"""Pre-RoPE keys and sinks through the evaluation code: every protocol, --bits, lm_eval args."""

from __future__ import annotations

import math

import pytest
import torch

import kvq
from kvq.eval.pipelines import expand
from kvq.eval.protocols import get_protocol


def config(rope: str, pipeline: str, sinks: int = 0) -> kvq.KVConfig:
    return kvq.KVConfig.from_dict({"keys": {"rope": rope, "pipeline": pipeline},
                                   "values": "fp16" if pipeline == "fp16" else "ptok>int4",
                                   "sinks": sinks})


CONFIGS = {"fp16": kvq.kv("fp16"), "pre-id": config("pre", "fp16", sinks=2),
           "pre2": config("pre", "pchan>int2", sinks=2), "post2": config("post", "pchan>int2")}


@pytest.mark.parametrize("name", ["teacher-forced", "seed", "streaming"])
def test_protocols_run_pre_rope_and_sinks(tiny, name):
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(3, model.config.vocab_size, (1, 40), generator=g)
    proto = get_protocol(name, continuation=8, steps=8, block=8, residual=8)
    s = proto.run(model, windows, CONFIGS)
    assert math.isclose(s["pre-id"].nll, s["fp16"].nll, rel_tol=1e-5)
    assert abs(s["pre2"].nll - s["post2"].nll) > 1e-3
    # the 2 sinks (fp32 K and V, 2 layers) and, in the cache, the rotary positions cost bytes
    assert s["pre2"].cache_bytes > s["post2"].cache_bytes


def test_bits_sweep_keeps_rope_and_sinks(tmp_path):
    path = tmp_path / "pre.yaml"
    path.write_text("keys: {rope: pre, pipeline: pchan>int4}\nvalues: ptok>int4\nsinks: 1\n")
    configs = expand([str(path)], [4, 2])
    got = configs["K:pchan>int2 V:ptok>int2 K@pre-rope sinks=1"]
    assert got.key_rope == "pre" and got.sinks == 1 and len(configs) == 3


def test_lm_eval_model_args(tiny_dir):
    from kvq.eval.lm_eval_model import KVQLM

    lm = KVQLM(pretrained=str(tiny_dir), kv="pchan>int4", sinks="2", key_rope="pre",
               device="cpu")
    assert lm.kv_config.sinks == 2 and lm.kv_config.key_rope == "pre"
    cache = lm.new_cache()
    assert cache.rope is not None and cache.layers[0].sinks == 2
    ids = torch.randint(3, 200, (1, 20), generator=torch.Generator().manual_seed(0))
    logits = lm._model_call(ids)
    assert logits.shape[:2] == (1, 20) and torch.isfinite(logits).all()
    info = lm.get_model_info()
    assert info["kvq_config"]["keys"] == {"rope": "pre", "pipeline": "pchan>int4"}
    with pytest.raises(kvq.KVQError, match="rope"):
        KVQLM(pretrained=str(tiny_dir), kv="pchan>int4", key_rope="middle", device="cpu")
