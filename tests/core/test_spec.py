"""Spec strings, YAML and JSON round-trip exactly; presets resolve; the schema exports."""

import json

import pytest
import yaml

import kvq
from kvq.spec.schema import json_schema

SPECS = [
    "nsep>pchan>int4", "ptok>int4", "int4", "int2(asym)", "int3", "int8(asym,dtype=bf16)",
    "group(32)>int4(asym)", "group(32,token)>int2(asym)", "group(16,token)>int4",
    "rot>ptok>int4(asym)", "rot(random,seed=3)>int4", "nsep(renorm=false)>pchan>int3",
    "nsep(fp32)>pchan>int4", "nsep>rot>pchan>int8", "none",
]


@pytest.mark.parametrize("spec", SPECS)
def test_spec_round_trip(spec):
    p = kvq.build(spec)
    assert p.to_spec() == spec
    assert kvq.build(p.to_spec()) == p
    assert kvq.Pipeline.model_validate_json(p.model_dump_json()) == p
    assert kvq.Pipeline.model_validate(yaml.safe_load(yaml.safe_dump(p.model_dump()))) == p


@pytest.mark.parametrize("spec", ["nsep > pchan > int4", " nsep>pchan>int4(sym) ",
                                  "nsep(renorm=true)>pchan>int4(scheme=sym)", "nsep>pchan>int(4)"])
def test_spellings_canonicalise(spec):
    assert kvq.build(spec).to_spec() == "nsep>pchan>int4"


def test_dict_steps_and_spec_agree():
    steps = [{"type": "nsep"}, {"type": "pchan"}, {"type": "int", "bits": 4}]
    assert kvq.build(steps) == kvq.build("nsep>pchan>int4")
    assert kvq.build([{"type": "int4", "scheme": "asym"}]) == kvq.build("int4(asym)")


@pytest.mark.parametrize("name", sorted(kvq.presets()))
def test_presets_round_trip(name, tmp_path):
    cfg = kvq.kv(name)
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"p{suffix}"
        cfg.save(path)
        assert kvq.load(path) == cfg
    assert kvq.KVConfig.from_dict(cfg.to_dict()) == cfg


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text(
        "name: mixed\n"
        "keys: ptok>int4\n"
        "values:\n  - {type: ptok}\n  - {type: int, bits: 4}\n"
        "layers:\n  0: {kv: nsep>pchan>int4}\n  3: {values: kivi2}\n")
    cfg = kvq.load(path)
    assert cfg.for_layer(0) == (kvq.build("nsep>pchan>int4"),) * 2
    assert cfg.for_layer(1) == (kvq.build("ptok>int4"),) * 2
    assert cfg.for_layer(3)[1] == kvq.build("group(32)>int2(asym)")
    again = tmp_path / "again.yaml"
    cfg.save(again)
    assert kvq.load(again) == cfg
    json_path = tmp_path / "again.json"
    cfg.save(json_path)
    assert kvq.load(json_path) == cfg


def test_kv_shortcut_and_preset_spec():
    cfg = kvq.kv("nsep>pchan>int4")
    assert cfg.keys == cfg.values == kvq.build("nsep-pchan4")
    assert kvq.kv({"kv": "naive4"}).keys == kvq.build("ptok>int4")
    assert kvq.kv("kivi4").keys.token_block == 32


def test_json_schema_lists_every_step():
    schema = json_schema()
    text = json.dumps(schema)
    for name in ("nsep", "pchan", "ptok", "group", "rot", "int", "none"):
        assert f'"const": "{name}"' in text
    assert json_schema("pipeline")["properties"]["steps"]


def test_pipeline_properties():
    p = kvq.build("nsep>pchan>int4")
    assert p.token_axis_stats and p.token_block is None and not p.is_identity
    assert not kvq.build("ptok>int4").token_axis_stats
    assert kvq.build("none").is_identity
    assert kvq.build("group(32,token)>int2(asym)").token_block == 32
