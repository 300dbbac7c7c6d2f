"""kvq_hf ``--model_args`` as lm-eval parses them (issue 18 item 7 and the comma case): lm-eval
turns ``none`` into None, ``true`` into True, numbers into numbers, and splits on commas."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from kvq.eval.errors import EvalError  # noqa: E402


def _lm(args: str):
    from kvq.eval.lm_eval_model import KVQLM

    return KVQLM.create_from_arg_string(args, {"device": "cpu"})


@pytest.mark.parametrize("side", ["keys", "values"])
def test_none_side_is_the_none_pipeline(tiny_dir, side):
    lm = _lm(f"pretrained={tiny_dir},kv=pchan>int2,{side}=none")
    assert getattr(lm.kv_config, side).to_spec() == "none"
    other = "values" if side == "keys" else "keys"
    assert getattr(lm.kv_config, other).to_spec() == "pchan>int2"


def test_kv_none_is_the_none_pipeline(tiny_dir):
    lm = _lm(f"pretrained={tiny_dir},kv=none")
    assert lm.kv_config.keys.to_spec() == lm.kv_config.values.to_spec() == "none"


@pytest.mark.parametrize("args, match", [
    ("kv=nsep>group(32,token)>int4", "kv='nsep>group\\(32' was cut at a comma"),
    ("kv=pchan>int4,values=int4(dtype=fp32,check_finite=false)", "values=.* was cut at a comma"),
    ("kv=int4,keys=true", "keys=True: expected a spec"),
    ("kv=8", "kv=8: expected a spec"),
    ("kv=int4,sinks=true", "sinks=True: expected a whole number"),
    ("kv=int4,sinks=1.5", "sinks=1.5: expected a whole number"),
])
def test_split_or_converted_specs_are_refused_before_loading(args, match):
    with pytest.raises(EvalError, match=match) as err:
        _lm(f"pretrained=/nonexistent/model,{args}")  # refused before the model loads
    assert str(err.value).startswith("kvq_hf model arg ") and len(str(err.value)) < 400
