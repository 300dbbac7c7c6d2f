"""Property/fuzz tests that stay in CI (issue 12, item 6): hostile spec strings, YAML/JSON
documents, tensors and plugin faults. Budgets are fixed and derandomized, so every CI run
tries the same inputs in bounded time (~30 s in all on one core)."""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvq
from kvq.errors import SHOW_MAX, KVQError
from kvq.testing import sqnr_db

BUDGET = dict(deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
MAX_MESSAGE = 6 * SHOW_MAX + 300

# spec strings ---------------------------------------------------------------------------------
WORDS = ["nsep", "pchan", "ptok", "rot", "group", "int", "int2", "int4", "int8", "none", "kivi4",
         "(", ")", ">", ",", "=", ";", "check_finite", "false", str(2**64), str(2**31), "-1",
         "0", "1e308", "nan", "inf", "true", "sym", "asym", "token", "channel", "fp16", "bf16",
         "fp32", "seed", "size", "bits", "kind", "random", "hadamard", "dtype", "renorm", " ",
         "\x00", "é", "1.5", "32", "16"]
spec_strings = st.one_of(
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map("".join),
    st.text(alphabet=st.sampled_from("nsepchalot()>,=;0123456789 x"), max_size=40),
    st.builds(lambda w, n: w * n, st.sampled_from(["nsep>", "x", "(", "9", "int4,"]),
              st.integers(1000, 30000)),
)


def _bounded(err: Exception) -> None:
    assert isinstance(err, KVQError), f"raw {type(err).__name__}: {str(err)[:200]}"
    assert len(str(err)) <= MAX_MESSAGE, f"{len(str(err))}-char message"


@settings(max_examples=400, **BUDGET)
@given(spec=spec_strings)
def test_fuzzed_spec_strings(spec):
    try:
        p = kvq.build(spec)
    except Exception as err:  # noqa: BLE001 - the property: only short kvq errors
        _bounded(err)
        return
    assert kvq.build(p.to_spec()) == p
    x = torch.randn(1, 2, 8, 64)
    try:
        y = p.roundtrip(x)
    except Exception as err:  # noqa: BLE001
        _bounded(err)
        return
    assert torch.isfinite(y).all() and y.shape == x.shape


# YAML / JSON documents ------------------------------------------------------------------------
KEYS = ["kv", "keys", "values", "layers", "name", "steps", "type", "bits", "check_finite",
        "scheme", "size", "axis", "renorm", "dtype", "kind", "seed", "0", "1", "x"]
scalars = st.one_of(st.sampled_from(["ptok>int4", "nsep>pchan>int4", "int8", "group(32)>int4",
                                     "kivi2", "none", "nsep", "int", "sym", "token", "q" * 500]),
                    st.integers(-2**70, 2**70), st.booleans(), st.none(),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS),
                                                      st.integers(-2, 40)), inner, max_size=4)),
    max_leaves=25)


@settings(max_examples=200, **BUDGET)
@given(doc=documents, as_json=st.booleans())
def test_fuzzed_pipeline_files(doc, as_json):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("f.json" if as_json else "f.yaml")
        path.write_text(json.dumps(doc) if as_json else yaml.safe_dump(doc))
        try:
            cfg = kvq.load(path)
        except Exception as err:  # noqa: BLE001
            _bounded(err)
            return
    assert isinstance(cfg, kvq.KVConfig)
    assert kvq.KVConfig.from_dict(cfg.to_dict()) == cfg


# tensors --------------------------------------------------------------------------------------
SPECS = ["ptok>int4", "ptok>int8", "nsep>pchan>int4", "group(32)>int4(asym)",
         "group(16,token)>int2(asym)", "rot>ptok>int4(asym)", "nsep(bf16)>ptok>int3", "none",
         "pchan>int8(dtype=fp32)"]
FLOOR = {2: -1.0, 3: 4.0, 4: 9.0, 8: 25.0, 16: 100.0}


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    shape = (draw(st.integers(0, 2)), draw(st.integers(0, 3)), draw(st.integers(0, 40)),
             draw(st.sampled_from([0, 16, 32, 64, 80])))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(shape, generator=g) * 10.0 ** draw(st.integers(-9, 5))
    if x.numel() and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, x.numel() - 1))
            x.view(-1)[i] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"),
                                                  0.0, -0.0, 65504.0, -65504.0, 1e-30]))
    return x.to(dtype)


@settings(max_examples=250, **BUDGET)
@given(spec=st.sampled_from(SPECS), x=tensors())
def test_fuzzed_tensors(spec, x):
    p = kvq.build(spec)
    try:
        y = p.roundtrip(x)
    except Exception as err:  # noqa: BLE001
        _bounded(err)
        return
    assert y.shape == x.shape and y.dtype == x.dtype
    if torch.isfinite(x).all():
        assert torch.isfinite(y).all(), "finite input came back with Inf/NaN"
        if x.abs().amax() > 0:
            assert not (y == 0).all(), "nonzero input came back as zeros"
            assert sqnr_db(x.float(), y.float()) > FLOOR[p.bits] - 3


# plugin faults ----------------------------------------------------------------------------------
FAULT_SOURCES = {
    "import": "raise ImportError('missing dependency')",
    "hook raises": "import kvq\n@kvq.hookimpl\ndef kvq_register_steps(register):\n"
                   "    raise RuntimeError('boom')",
    "signature": "import kvq\n@kvq.hookimpl\ndef kvq_register_steps(reg, extra):\n    pass",
    "defaults": "import kvq\n@kvq.hookimpl\ndef kvq_register_steps(register):\n"
                "    register('int5', 'kvq.quantizers.integer:IntQuantizer', defaults=[5])",
    "collision": "import kvq\n@kvq.hookimpl\ndef kvq_register_presets(register):\n"
                 "    register('kivi4', lambda: kvq.kv('int4'))",
    "type": "import kvq\nfrom kvq.quantizers.none import NoQuantizer\n@kvq.hookimpl\n"
            "def kvq_register_steps(register):\n    register('nothing', NoQuantizer)",
    "preset": "import kvq\n@kvq.hookimpl\ndef kvq_register_presets(register):\n"
              "    register('p1', lambda: 1 / 0)",
    "ok": "import kvq\n@kvq.hookimpl\ndef kvq_register_presets(register):\n"
          "    register('fine{n}', lambda: kvq.kv('int4'))",
}


class _EP:
    def __init__(self, name, source):
        self.name, self.source = name, source

    def load(self):
        import types

        mod = types.ModuleType(self.name)
        exec(compile(self.source, self.name, "exec"), mod.__dict__)  # noqa: S102
        return mod


@contextlib.contextmanager
def _fresh_plugins(eps):
    from kvq import plugins
    from kvq.registry import BACKENDS, PRESETS, STEPS

    saved = (plugins._pm, plugins._status, plugins._entry_points,
             [dict(r._entries) for r in (STEPS, BACKENDS, PRESETS)])
    for r in (STEPS, BACKENDS, PRESETS):
        r._entries = {}
    plugins._pm, plugins._status, plugins._entry_points = None, {}, lambda: eps
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield plugins
    finally:
        plugins._pm, plugins._status, plugins._entry_points = saved[:3]
        for r, entries in zip((STEPS, BACKENDS, PRESETS), saved[3]):
            r._entries = entries


@pytest.fixture(autouse=True)
def _third_party_plugins_on(monkeypatch):
    monkeypatch.delenv("KVQ_DISABLE_PLUGINS", raising=False)


@settings(max_examples=30, **BUDGET)
@given(faults=st.lists(st.sampled_from(sorted(FAULT_SOURCES)), min_size=1, max_size=4))
def test_fuzzed_plugin_faults(faults):
    eps = [_EP(f"p{i}", FAULT_SOURCES[f].replace("{n}", str(i))) for i, f in enumerate(faults)]
    with _fresh_plugins(eps) as plugins:
        status = {s.name: s for s in plugins.plugin_status()}
        for i, fault in enumerate(faults):
            want = "ok" if fault == "ok" else "broken"
            assert status[f"p{i}"].state == want, (fault, status[f"p{i}"])
        from kvq.registry import PRESETS, STEPS

        assert kvq.build("nsep>pchan>int4").to_spec() == "nsep>pchan>int4"
        assert "kivi4" in PRESETS and PRESETS.entry("kivi4").source == "kvq"
        assert not [e for e in STEPS.entries() if e.source != "kvq"]
        assert sum(e.source != "kvq" for e in PRESETS.entries()) == faults.count("ok")
