"""KVConfig's key rope (``keys: {rope: pre, pipeline: ...}``) and ``sinks``: parsing, per-layer
overrides, round trips through dict / YAML / JSON files, labels, errors."""

from __future__ import annotations

import pytest
import yaml

import kvq
from kvq.errors import SpecError
from kvq.kvconfig import KVConfig

TEXT = """
name: kvq-pre
keys: {rope: pre, pipeline: pchan>int3}
values: ptok>int3
sinks: 2
layers:
  0: {keys: {rope: post}}
  1: {kv: kivi2}
  2: {keys: {rope: post, pipeline: ptok>int4}, values: ptok>int8}
"""


def test_parse_overrides_and_round_trip(tmp_path):
    cfg = KVConfig.from_dict(yaml.safe_load(TEXT))
    assert cfg.key_rope == "pre" and cfg.sinks == 2 and cfg.uses_pre_rope
    assert [cfg.key_rope_for(i) for i in range(4)] == ["post", "pre", "post", "pre"]
    assert cfg.for_layer(0)[0] == kvq.build("pchan>int3")  # rope-only override keeps the pipeline
    assert cfg.for_layer(2) == (kvq.build("ptok>int4"), kvq.build("ptok>int8"))
    assert cfg.to_dict()["keys"] == {"rope": "pre", "pipeline": "pchan>int3"}
    assert cfg.to_dict()["layers"][0] == {"keys": {"rope": "post"}}
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"c{suffix}"
        cfg.save(path)
        assert kvq.load(path) == cfg
    assert KVConfig.from_dict(cfg.to_dict()) == cfg


def test_defaults_stay_out_of_files_and_labels():
    plain = KVConfig.from_dict({"kv": "ptok>int4"})
    assert plain.key_rope == "post" and plain.sinks == 0 and not plain.uses_pre_rope
    assert plain.to_dict() == {"keys": "ptok>int4", "values": "ptok>int4"}
    assert plain.label == "ptok>int4"
    pre = KVConfig.from_dict({"kv": {"rope": "pre", "pipeline": "ptok>int4"}, "sinks": 4})
    assert pre.values == kvq.build("ptok>int4") and pre.key_rope == "pre"
    assert pre.label == "ptok>int4 K@pre-rope sinks=4"
    one = KVConfig.from_dict({"kv": "ptok>int4", "layers": {3: {"keys": {"rope": "pre"}}}})
    assert one.uses_pre_rope and one.key_rope_for(3) == "pre" and one.key_rope_for(2) == "post"


def test_sinks_add_exact_tokens_to_the_bits_estimate():
    base = KVConfig.from_dict({"kv": "ptok>int4"})
    with_sinks = base.model_copy(update={"sinks": 4})
    assert with_sinks.bits_per_element(64, 1024) == pytest.approx(
        base.bits_per_element(64, 1024) + 16 * 4 / 1024)


@pytest.mark.parametrize("data,message", [
    ({"keys": {"rope": "pre"}, "values": "ptok>int4"}, "without a pipeline"),
    ({"keys": {"rope": "mid", "pipeline": "ptok>int4"}, "values": "ptok>int4"}, "neither"),
    ({"keys": {"rope": "pre", "pipline": "ptok>int4"}, "values": "ptok>int4"}, "'pipline'"),
    ({"keys": "ptok>int4", "values": {"rope": "pre", "pipeline": "ptok>int4"}}, "key option"),
    ({"kv": "ptok>int4", "sinks": -1}, "sinks"),
    ({"keys": {"rope": "pre", "pipeline": "ptok>int4"}, "key_rope": "post",
      "values": "ptok>int4"}, "contradicts"),
])
def test_bad_rope_and_sinks_are_spec_errors(data, message):
    with pytest.raises(SpecError, match=message):
        KVConfig.from_dict(data)


def test_cli_shows_rope_and_sinks(tmp_path, capsys):
    from kvq.cli.main import main

    path = tmp_path / "pre.yaml"
    path.write_text("keys: {rope: pre, pipeline: pchan>int3}\nvalues: ptok>int3\nsinks: 2\n")
    assert main(["validate", str(path)]) == 0
    assert "keys pchan>int3 (before RoPE), values ptok>int3, 2 sink(s)" in capsys.readouterr().out
    assert main(["explain", str(path), "--head-dim", "64", "--seq", "64"]) == 0
    out = capsys.readouterr().out
    assert "(quantized before RoPE)" in out and "first 2 token(s)" in out
    assert main(["schema"]) == 0
    schema = capsys.readouterr().out
    assert '"sinks"' in schema and '"KeysWithRope"' in schema


@pytest.mark.parametrize("field, value", [("sinks", True), ("sinks", 1.0), ("sinks", "2"),
                                          ("skip", [True]), ("skip", [1.0])])
def test_token_counts_and_layers_are_whole_numbers(field, value):
    """YAML ``sinks: true`` or ``skip: [1.0]`` is refused, never read as 1 (issue 18)."""
    import kvq
    from kvq.errors import SpecError

    with pytest.raises(SpecError, match=field):
        kvq.KVConfig.from_dict({"keys": "ptok>int4", "values": "ptok>int4", field: value})
