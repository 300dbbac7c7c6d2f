"""Function-preserving outlier stress (kvq.eval.stress) on every tiny family with RoPE."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from hf_models import VOCAB, family_configs  # noqa: E402

from kvq.eval.errors import EvalError  # noqa: E402
from kvq.eval.stress import StressSpec, apply_stress, rotary_units  # noqa: E402

ROPE_FAMILIES = ["gpt_neox", "qwen2", "llama", "mistral", "falcon", "gptj", "phi3", "gemma"]


def _fresh(family):
    import transformers as tf

    torch.manual_seed(0)
    cfg = family_configs()[family]
    if family == "qwen2":  # Qwen2 has q/k/v biases: they must be scaled too
        cfg.attention_bias = True
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def _keys(model, ids):
    """Post-RoPE keys of layer 0 as the cache receives them: (batch, kv_heads, seq, head_dim)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits
    return logits, cache.layers[0].keys


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_stress_preserves_logits_and_plants_outliers(family):
    model = _fresh(family)
    ids = torch.randint(3, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    before, k0 = _keys(model, ids)
    report = apply_stress(model, StressSpec(scale=30.0, layers=(0,), pairs=2))
    after, k1 = _keys(model, ids)
    assert (after - before).abs().max().item() <= 1e-3
    for h, channels in report["layers"][0].items():
        ratio = k1[:, h].abs().amax(dim=(0, 1)) / k0[:, h].abs().amax(dim=(0, 1))
        scaled = torch.zeros_like(ratio, dtype=torch.bool)
        scaled[channels] = True
        assert torch.allclose(ratio[scaled], torch.full_like(ratio[scaled], 30.0), rtol=1e-3)
        assert torch.allclose(ratio[~scaled], torch.ones_like(ratio[~scaled]), rtol=1e-3)


def test_half_a_rotary_pair_is_not_function_preserving():
    """The test above can fail: scaling one channel of a RoPE pair changes the logits."""
    model = _fresh("llama")
    ids = torch.randint(3, VOCAB, (1, 29), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
        attn = model.model.layers[0].self_attn
        attn.k_proj.weight[0] *= 30.0
        attn.q_proj.weight[0] /= 30.0  # channel 0 only, without its partner 8
        after = model(ids).logits
    assert (after - before).abs().max().item() > 1e-3


def test_rotary_units():
    assert rotary_units(8, 8, False) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert rotary_units(8, 4, True) == [(0, 1), (2, 3), (4,), (5,), (6,), (7,)]
    assert rotary_units(6, 4, False) == [(0, 2), (1, 3), (4,), (5,)]


def test_parse_and_errors():
    assert StressSpec.parse("scale=4,layers=0-2+5,pairs=1") == StressSpec(4.0, (0, 1, 2, 5), 1)
    assert StressSpec.parse("layers=all").layers is None
    assert StressSpec.parse(None) == StressSpec()
    for bad in ("scale", "size=3", "scale=-1", "layers=a-b", "pairs=0"):
        with pytest.raises(EvalError, match="--stress"):
            StressSpec.parse(bad)
    with pytest.raises(EvalError, match="layer 9 does not exist"):
        apply_stress(_fresh("llama"), "layers=9")
    with pytest.raises(EvalError, match="gpt2"):
        apply_stress(_fresh("gpt2"), "layers=0")


def test_compare_stress_keeps_fp16_and_moves_naive(tiny_dir, text_file, tmp_path):
    """kvq compare --stress: the fp16 PPL is unchanged (same function), naive INT4 moves."""
    import json

    from kvq.cli.main import main

    rows = {}
    for name, extra in (("plain", []), ("stress", ["--stress", "scale=30,layers=0-1"])):
        out = tmp_path / name
        assert main(["compare", "--model", str(tiny_dir), "--corpus", str(text_file),
                     "--pipelines", "naive4", "--context", "64", "--tokens", "128",
                     "--protocols", "teacher-forced", "--out", str(out), "--quiet",
                     "--no-plot", *extra]) == 0
        report = json.loads((out / "results.json").read_text())
        rows[name] = {r["pipeline"]: r["value"] for r in report["rows"]}
    assert report["stress"]["spec"] == "scale=30,layers=0+1,pairs=4"
    assert rows["stress"]["fp16"] == pytest.approx(rows["plain"]["fp16"], rel=1e-4)
    assert rows["stress"]["naive4"] != pytest.approx(rows["plain"]["naive4"], rel=1e-4)
