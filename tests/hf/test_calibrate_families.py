"""``calibrate`` with Fisher sensitivity runs on a tiny model of every family the cache supports.

The Fisher weights are the squared loss gradients of the K/V each attention layer wrote
(:mod:`kvq.eval.capture`). Sliding-window layers (Gemma 2/3, Cohere2, gpt-oss, Mistral) used to
store a slice of those tensors outside the autograd graph, so their gradient was None and
calibration died; every family must now calibrate a nuq recipe with post-RoPE keys and a
transform-coding recipe with pre-RoPE keys (post-RoPE where the family has no RoPE to undo).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from hf_models import family_configs, sliding_configs

import kvq
from kvq.eval.calibrate import calibrate
from kvq.hf import KVQCache, cache_kwargs
from kvq.hf.rope import ADAPTERS

FAMILIES = [*family_configs(), *sliding_configs()]


def tiny(name, vocab):
    cfg = {**family_configs(), **sliding_configs()}[name]
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_fisher_calibration_runs_on_every_family(name, bpe, tmp_path):
    tok, text = bpe
    model = tiny(name, len(tok))
    mtype = model.config.get_text_config(decoder=True).model_type
    rope = "pre" if mtype in ADAPTERS and not getattr(model.config, "alibi", False) else "post"
    ids = torch.randint(3, len(tok), (1, 20), generator=torch.Generator().manual_seed(0))
    for recipe, key_rope in (("kvquant2", "post"), ("tc2", rope)):
        out = tmp_path / f"{recipe}.yaml"
        calibrate(recipe, out=out, progress=False, loaded=(model, tok), corpus=str(text),
                  tokens=64, context=32, block=16, key_rope=key_rope, sensitivity="fisher")
        assert "sensitivity fisher" in out.read_text().splitlines()[0]
        cfg = kvq.load(out)
        assert cfg.key_rope == key_rope
        cache = KVQCache(cfg, model, residual=4, block=16)
        with torch.no_grad():
            logits = model(ids, **cache_kwargs(model, cache)).logits
        assert torch.isfinite(logits).all()
