"""The fast decode path on artifacts really fitted by ``kvq calibrate`` (tiny Llama): ``tc3``
with a ``--bits`` budget (alloc widths 2/3/4 mixed over layers) and calibrated ``kvquant3``,
both with pre-RoPE keys and a sink, equal the general path decode step by decode step."""

import pytest
import torch

import kvq
from kvq.cli.main import main
from kvq.hf import KVQCache, cache_kwargs
from kvq.hf.attention import register


@pytest.mark.parametrize("argv", [["--recipe", "tc3", "--bits", "3.6"],
                                  ["--recipe", "kvquant3", "--block", "16"]])
def test_fitted_recipe_decodes_fast_as_general(argv, tiny, tiny_dir, text_file, tmp_path):
    out = tmp_path / "fit.yaml"
    assert main(["calibrate", "--quiet", *argv, "--model", str(tiny_dir), "--corpus",
                 str(text_file), "--tokens", "256", "--context", "64", "--out", str(out)]) == 0
    model, _ = tiny
    cfg = kvq.load(out)
    assert cfg.key_rope == "pre" and cfg.sinks == 1
    ids = torch.randint(3, 200, (2, 45), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0  # left padding: row 1's sink is at position 6
    tokens = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(1))
    register()
    runs = []
    for impl, attention in (("sdpa", "dequantize"), ("kvq", "fast")):
        model.set_attn_implementation(impl)
        cache = KVQCache(cfg, model, residual=2, block=16, attention=attention)
        kw, m, logits = cache_kwargs(model, cache), mask, []
        with torch.no_grad():
            logits.append(model(ids, attention_mask=m, **kw).logits[:, -1])
            for i in range(tokens.shape[1]):
                m = torch.cat([m, m.new_ones(2, 1)], dim=1)
                logits.append(model(tokens[:, i:i + 1], attention_mask=m, **kw).logits[:, -1])
        runs.append(torch.stack(logits, 1))
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(runs[1], runs[0], atol=2e-5, rtol=0)
