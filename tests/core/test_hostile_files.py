"""Hostile pipeline files and specs give short, located SpecErrors (issue 12, item 2)."""

import json

import pytest

import kvq
from kvq.errors import SHOW_MAX, SpecError


def bomb(levels: int, fan: int, where: str) -> str:
    parts = ["&a0 [" + ", ".join(['"int4"'] * fan) + "]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]" for i in range(1, levels)]
    return where.replace("BOMB", "[" + ", ".join(parts) + "]") + "\n"


def load_text(tmp_path, text, suffix=".yaml"):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return kvq.load(path)


@pytest.mark.parametrize("where", ["kv: BOMB", "kv: [{type: nsep, renorm: BOMB}, int4]",
                                   "keys: {steps: BOMB}\nvalues: int4",
                                   "kv: int4\nlayers: {0: {kv: BOMB}}"])
def test_alias_bombs_are_refused_at_once(tmp_path, where):
    with pytest.raises(SpecError, match=r"YAML alias of the anchor at line \d .*aliases") as e:
        load_text(tmp_path, bomb(9, 9, where))  # 387M strings if expanded
    assert len(str(e.value)) < 400


def test_any_alias_is_refused(tmp_path):
    with pytest.raises(SpecError, match="alias of the anchor at line 1"):
        load_text(tmp_path, "keys: &p ptok>int4\nvalues: *p\n")


@pytest.mark.parametrize("text, line", [
    ("kv: ptok>int4\nkv: int2\n", 2),
    ("kv: ptok>int4\nlayers:\n  0: int8\n  0: int2\n", 4),
    ("kv: ptok>int4\nlayers:\n  1: int8\n  0x1: int2\n", 4),
])
def test_duplicate_yaml_keys(tmp_path, text, line):
    with pytest.raises(SpecError, match=f"duplicate key .* at line {line}"):
        load_text(tmp_path, text)


def test_duplicate_json_keys(tmp_path):
    with pytest.raises(SpecError, match="duplicate key 'kv'"):
        load_text(tmp_path, '{"kv": "ptok>int4", "kv": "int2"}', ".json")


@pytest.mark.parametrize("key", ["true", "1.5", "null", "[0, 1]"])
def test_non_integer_yaml_layer_keys(tmp_path, key):
    with pytest.raises(SpecError, match="at line 3 .* not a name or an integer"):
        load_text(tmp_path, f"kv: ptok>int4\nlayers:\n  {key}: int8\n")


@pytest.mark.parametrize("key", ["01", "-1", "x", " 1"])
def test_non_canonical_json_layer_keys(tmp_path, key):
    with pytest.raises(SpecError, match="not a layer number"):
        load_text(tmp_path, json.dumps({"kv": "ptok>int4", "layers": {key: "int8"}}), ".json")


def test_layer_keys_from_python_dicts():
    with pytest.raises(SpecError, match="layer key True is not a layer number"):
        kvq.KVConfig.from_dict({"kv": "int4", "layers": {True: "int8"}})
    assert kvq.KVConfig.from_dict({"kv": "int4", "layers": {"3": "int8"}}).layers[3]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_non_utf8(tmp_path, suffix):
    with pytest.raises(SpecError, match="not UTF-8 text .*line 2"):
        load_text(tmp_path, b'{"kv":\n "int4\xff"}', suffix)


@pytest.mark.parametrize("text, suffix", [
    ("kv: " + "[" * 5000 + "]" * 5000, ".yaml"),
    ('{"kv": ' + "[" * 50000 + "]" * 50000 + "}", ".json"),
    ("kv:\n" + "".join(" " * i + "a:\n" for i in range(1, 400)), ".yaml"),
    ("kv: " + "[" * 70 + "]" * 70, ".yaml"),
])
def test_deep_nesting(tmp_path, text, suffix):
    with pytest.raises(SpecError, match="nest|malformed YAML"):
        load_text(tmp_path, text, suffix)


def test_python_tags_are_not_constructed(tmp_path):
    with pytest.raises(SpecError, match="malformed YAML"):
        load_text(tmp_path, "kv: !!python/object/apply:os.system ['true']\n")


@pytest.mark.parametrize("spec", ["q" * 100_000, "nsep>" * 20_000 + "int4",
                                  "int4(" + ",".join(["sym"] * 5000) + ")",
                                  "group(" + "9" * 5000 + ")>int4", "rot(kind=" + "x" * 9999 + ")"])
def test_long_specs_give_short_errors(tmp_path, spec):
    for attempt in (lambda: kvq.build(spec), lambda: load_text(tmp_path, f"kv: '{spec}'\n")):
        with pytest.raises(SpecError) as e:
            attempt()
        assert len(str(e.value)) < 6 * SHOW_MAX + 200
        assert len(e.value.detail) < 9 * SHOW_MAX + 200


def test_caret_stays_under_the_error_in_a_long_spec():
    spec = "ptok>" + "x" * 5000 + ">int4"
    with pytest.raises(SpecError) as e:
        kvq.build(spec)
    shown, caret = e.value.detail.splitlines()[1:]
    assert shown.strip().startswith("'") is False and caret.index("^") - 2 < len(shown)


def test_many_layer_overrides_parse_each_spec_once(tmp_path):
    text = "kv: ptok>int4\nlayers:\n" + "".join(f"  {i}: ptok>int8\n" for i in range(20_000))
    cfg = load_text(tmp_path, text)
    assert len(cfg.layers) == 20_000
    assert cfg.layers[0].keys is cfg.layers[19_999].keys  # one parsed pipeline, shared


@pytest.mark.parametrize("flag", ["--head-dim", "--layers"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_validate_rejects_non_positive_sizes(capsys, flag, value):
    from kvq.cli.main import main

    assert main(["validate", "nsep>pchan>int4", flag, value]) == 2
    err = capsys.readouterr().err
    assert "must be at least 1" in err and len(err.strip().splitlines()) == 1
