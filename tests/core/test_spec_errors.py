"""Bad input gets a clear KVQError naming the problem, the position and a suggestion."""

import pytest
import torch

import kvq
from kvq.errors import NumericsError, SpecError


@pytest.mark.parametrize("spec, words, pos", [
    ("nsepp>pchan>int4", ["unknown step 'nsepp'", "did you mean 'nsep'"], 0),
    ("nsep>pchan>int9", ["bit width 9", "int2, int3, int4 or int8"], 11),
    ("group(0)>int4", ["size=0", "greater than 0", "usage: group(size"], 0),
    ("group(-3)>int4", ["size=-3", "greater than 0"], 0),
    ("nsep>pchan", ["no quantizer", "end it with"], 5),
    ("int4>int8", ["second quantizer 'int8'", "exactly one quantizer"], 5),
    ("pchan>ptok>int4", ["second granularity 'ptok'"], 6),
    ("pchan>nsep>int4", ["'nsep' after the granularity", "transforms first"], 6),
    ("nsep>nsep>int4", ["appears twice"], 5),
    ("int4>pchan", ["after the quantizer"], 5),
    ("int4(foo)", ["scheme='foo'", "'sym' or 'asym'"], 0),
    ("nsep(renorm=maybe)>int4", ["renorm"], 0),
    ("group(32", ["unclosed"], 8),
    ("nsep>>int4", ["expected a step name"], 5),
    ("nsep pchan", ["unexpected 'p'"], 5),
    ("ptok(3)>int4", ["takes no arguments"], 0),
    ("", ["empty pipeline spec"], None),
    ("nsep>none", ["'none' quantizer"], 0),
    ("kivi4", ["different key and value pipelines", "kvq.kv('kivi4')"], None),
])
def test_bad_specs(spec, words, pos):
    with pytest.raises(SpecError) as info:
        kvq.build(spec)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    if pos is not None:
        assert info.value.pos == pos
        assert info.value.detail.splitlines()[-1].index("^") - 2 == pos


@pytest.mark.parametrize("text, words", [
    ("keys: ptok>int4\nvalues: [unclosed\n", ["malformed YAML", "line 3"]),
    ("keys: ptok>int4\nvaluez: ptok>int4\n", ["unknown key 'valuez'", "did you mean 'values'"]),
    ("keys: ptok>int4\n", ["values"]),
    ("foo: 1\n", ["no pipeline given"]),
    ("kv: nsep>pchan>int5\n", ["bit width 5"]),
    ("kv: ptok>int4\nlayers:\n  zero: {kv: int8}\n", ["layers"]),
    ("kv: [{type: int, bits: 9}]\n", ["bits", "9"]),
    ("kv: [{bits: 4}]\n", ["without a 'type'"]),
])
def test_bad_yaml(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        kvq.load(path)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_missing_file_and_unknown_layer():
    with pytest.raises(SpecError, match="no such pipeline file"):
        kvq.load("does/not/exist.yaml")
    cfg = kvq.kv({"kv": "ptok>int4", "layers": {40: {"kv": "int8"}}})
    with pytest.raises(SpecError, match="layer 40, but the model has 30 layers"):
        cfg.check(num_layers=30, head_dim=64)
    with pytest.raises(SpecError, match="does not divide head_dim 80"):
        kvq.kv("group(64)>int4").check(num_layers=2, head_dim=80)


def test_bad_tensors():
    p = kvq.build("nsep>pchan>int4")
    with pytest.raises(kvq.KVQError, match=r"\(batch, kv_heads, seq, head_dim\)"):
        p.quantize(torch.randn(8, 64))
    with pytest.raises(kvq.KVQError, match="floating-point"):
        p.quantize(torch.ones(1, 1, 4, 8, dtype=torch.int32))
    with pytest.raises(kvq.KVQError, match="statistics over tokens but got seq=1"):
        p.quantize(torch.randn(1, 1, 1, 64))
    with pytest.raises(kvq.KVQError, match="group size 32 does not divide head_dim 80"):
        kvq.build("group(32)>int4").quantize(torch.randn(1, 1, 4, 80))


def test_non_finite_policy():
    x = torch.randn(1, 1, 4, 64)
    x[0, 0, 2, 3] = float("nan")
    with pytest.raises(NumericsError, match="NaN or Inf"):
        kvq.build("ptok>int4").quantize(x)
    x[0, 0, 2, 3] = float("inf")
    with pytest.raises(NumericsError):
        kvq.build("nsep>pchan>int4").quantize(x)
    lenient = kvq.Pipeline(steps=kvq.build("ptok>int8").steps, check_finite=False)
    lenient.quantize(x)  # allowed, documented: the result for that token is undefined


def test_fp16_norm_overflow():
    x = torch.full((1, 1, 4, 128), 1e4)  # norm 1.1e5 > fp16 max
    with pytest.raises(NumericsError, match="overflows float16.*nsep\\(dtype=fp32\\)"):
        kvq.build("nsep>pchan>int4").quantize(x)
    y = kvq.build("nsep(fp32)>pchan>int4").roundtrip(x)
    assert torch.allclose(y, x, rtol=1e-3)
    assert torch.isfinite(kvq.build("nsep(bf16)>pchan>int4").roundtrip(x)).all()


def test_explicit_unknown_backend():
    with pytest.raises(SpecError, match="unknown backend 'cuda'.*known backends"):
        kvq.build("int4").quantize(torch.randn(1, 1, 4, 64), backend="cuda")
