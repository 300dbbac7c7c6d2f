"""Model loading refuses a checkpoint that lacks weights (issue 18 item 1): transformers loads
it with exit 0 and fills the missing weights with random values."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from kvq.eval import models
from kvq.eval.errors import EvalError


@pytest.fixture
def copy(tiny_dir, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_dir, out)
    return out


def test_complete_checkpoint_loads(copy):
    model, _ = models.load(str(copy))
    assert model.config.num_hidden_layers >= 1


@pytest.mark.parametrize("damage", ["overwritten", "one weight dropped"])
def test_checkpoint_lacking_weights_is_refused(copy, damage):
    weights = copy / "model.safetensors"
    tensors = load_file(weights)
    if damage == "overwritten":  # e.g. a calibration artifact written over the weights
        tensors = {"layers.0.keys.codebook": tensors[next(iter(tensors))][:4].clone()}
    else:
        tensors.pop(sorted(k for k in tensors if "mlp" in k)[0])
    save_file(tensors, weights)
    with pytest.raises(EvalError, match=r"lacks \d+ weight\(s\).*restore them") as err:
        models.load(str(copy))
    assert str(copy) in str(err.value)


def test_cli_exits_2_with_one_line(copy, text_file, capsys):
    from kvq.cli.main import main

    save_file({"x": load_file(copy / "model.safetensors")["model.norm.weight"]},
              copy / "model.safetensors")
    assert main(["compare", "--quiet", "--model", str(copy), "--corpus", str(text_file),
                 "--context", "48", "--pipelines", "naive4"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kvq")]
    assert "Traceback" not in err and len(lines) == 1 and "lacks" in lines[0]


def test_lm_eval_kvq_hf_refuses_it_too(copy):
    pytest.importorskip("lm_eval")
    from kvq.eval.lm_eval_model import KVQLM

    tensors = load_file(copy / "model.safetensors")
    tensors.pop(sorted(k for k in tensors if "mlp" in k)[0])
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(EvalError, match=r"lacks 1 weight\(s\).*restore them"):
        KVQLM.create_from_arg_string(f"pretrained={copy},kv=naive4", {"device": "cpu"})


def test_lm_eval_kvq_hf_loads_a_complete_checkpoint(copy):
    pytest.importorskip("lm_eval")
    from kvq.eval.lm_eval_model import KVQLM

    lm = KVQLM.create_from_arg_string(f"pretrained={copy},kv=naive4", {"device": "cpu"})
    assert lm.model.config.num_hidden_layers >= 1
