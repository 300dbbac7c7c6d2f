"""A broken plugin is reported by name and never takes the built-ins or other plugins down
(issue 12, item 3). Fake plugins are injected through ``kvq.plugins._entry_points``."""

import types
import warnings
from typing import Literal

import pytest

import kvq
from kvq import plugins
from kvq.registry import BACKENDS, PRESETS, STEPS
from kvq.transforms.base import Transform


class Neg(Transform):
    """x -> -x (a test transform)."""

    type: Literal["neg"] = "neg"

    def forward(self, x):
        return x.neg(), {}

    def inverse(self, x, meta):
        return x.neg()


class Kivi4(Neg):
    """A step named like the built-in preset ``kivi4``."""

    type: Literal["kivi4"] = "kivi4"


def module(**hooks):
    return types.SimpleNamespace(**{f"kvq_register_{k}": kvq.hookimpl(v)
                                    for k, v in hooks.items()})


def steps(*items):
    def hook(register):
        for item in items:
            register(*item[:2], defaults=item[2] if len(item) > 2 else None)
    return hook


def failing_import():
    raise ImportError("no module named 'missing_dep'")


def raising_hook(register):
    register("neg", Neg)
    raise RuntimeError("hook failed half-way")


def wrong_signature(reg, extra):
    pass


def no_arguments():
    pass


FAULTS = {
    "import": (failing_import, "import failed: ImportError: no module named 'missing_dep'"),
    "hook raises": (lambda: module(steps=raising_hook), "RuntimeError: hook failed half-way"),
    "wrong signature": (lambda: module(steps=wrong_signature), "hook check failed"),
    "no arguments": (lambda: module(steps=no_arguments), "TypeError"),
    "bad default value": (lambda: module(steps=steps(
        ("neg", Neg), ("int5", "kvq.quantizers.integer:IntQuantizer", {"bits": 5}))),
        None),  # lazy target: found broken when first loaded
    "defaults not a dict": (lambda: module(steps=steps(
        ("neg", Neg), ("int4x", Neg, [1, 2]))), "defaults of step 'int4x' must be a dict"),
    "unknown default": (lambda: module(steps=steps(("neg", Neg, {"size": 3}))),
                        "defaults ['size'] of step 'neg' are not fields of Neg"),
    "collision": (lambda: module(steps=steps(("neg", Neg), ("nsep", Neg))),
                  "step 'nsep' from 'bad' collides with the one from 'kvq'"),
    "type is not the name": (lambda: module(steps=steps(("negate", Neg))),
                             "whose type is 'neg', so its to_spec() would not build"),
    "bad name": (lambda: module(steps=steps(("ne g", Neg))), "invalid step name"),
    "preset fails": (lambda: module(steps=steps(("neg", Neg)), presets=lambda register: register(
        "badpreset", lambda: kvq.kv("neg>int9"))), "unsupported bit width 9"),
    "not a step": (lambda: module(steps=steps(("neg", dict))), "is not a kvq.Step subclass"),
    # issue 18 item 9: steps and presets share one namespace
    "preset named like a step": (lambda: module(presets=lambda register: register(
        "int8", lambda: kvq.kv("int4"))), "preset 'int8' from 'bad' collides with the step "
                                          "'int8' from 'kvq'"),
    "step named like a preset": (lambda: module(steps=steps(("kivi4", Kivi4))),
                                 "step 'kivi4' from 'bad' collides with the preset 'kivi4'"),
    "step and preset of one name": (lambda: module(steps=steps(("neg", Neg)), presets=lambda
                                                   register: register("neg", lambda: kvq.kv(
                                                       "int4"))), "registered twice"),
}


class EntryPoint:
    def __init__(self, name, load):
        self.name, self.load = name, load


@pytest.fixture
def fake_plugins(monkeypatch):
    """Install entry points ``[(name, loader)]`` and reload the plugins from scratch."""
    for registry in (STEPS, BACKENDS, PRESETS):
        monkeypatch.setattr(registry, "_entries", {})
    monkeypatch.setattr(plugins, "_pm", None)
    monkeypatch.setattr(plugins, "_status", {})
    monkeypatch.delenv("KVQ_DISABLE_PLUGINS", raising=False)

    def install(*eps):
        monkeypatch.setattr(plugins, "_entry_points", lambda: [EntryPoint(*e) for e in eps])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plugins.load_plugins()
        install.warned = [str(w.message) for w in caught
                          if issubclass(w.category, plugins.KVQPluginWarning)]
        return {s.name: s for s in plugins.plugin_status()}

    return install


def good():
    return module(steps=steps(("neg", Neg)))


@pytest.mark.parametrize("fault", FAULTS)
def test_broken_plugin_is_isolated(fake_plugins, fault, capsys):
    make, reason = FAULTS[fault]
    if fault == "bad default value":
        status = fake_plugins(("bad", make))
        assert status["bad"].state == "ok"
        with pytest.warns(plugins.KVQPluginWarning), pytest.raises(kvq.KVQError,
                                                                   match="plugin 'bad' is broken"):
            kvq.build("int5")
        assert plugins._status["bad"].state == "broken" and "neg" not in STEPS
        return
    status = fake_plugins(("bad", make), ("good", good))
    assert status["bad"].state == "broken" and reason in status["bad"].reason
    assert fake_plugins.warned == [f"kvq: plugin 'bad' skipped: {status['bad'].reason}"]
    assert status["builtins"].state == "ok"
    # the built-ins work, again and again (no half-loaded registry)
    for _ in range(2):
        assert kvq.build("nsep>pchan>int4").to_spec() == "nsep>pchan>int4"
        assert "kivi4" in PRESETS
    # the bad plugin left nothing behind (atomic); a good plugin loaded beside it
    assert not [e for e in STEPS.entries() if e.source == "bad"]
    assert status["good"].state == "ok" and kvq.build("neg>int4").to_spec() == "neg>int4"
    # the CLI lists it as broken, with the reason, and the other commands still run
    from kvq.cli.main import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "nsep" in out and "kivi4" in out
    assert any(line.split()[:2] == ["bad", "broken"] for line in out.splitlines())
    assert main(["list", "--plugins"]) == 0 and "broken" in capsys.readouterr().out
    assert main(["explain", "kivi4"]) == 0 and main(["schema"]) == 0


def test_lazy_target_that_fails_to_import_breaks_only_its_plugin(fake_plugins, capsys):
    lazy = module(steps=steps(("neg", Neg), ("ghost", "no_such_module:Ghost")))
    status = fake_plugins(("lazy", lambda: lazy), ("good", lambda: module(
        presets=lambda register: register("negp", lambda: kvq.kv("int4")))))
    assert status["lazy"].state == "ok" and "ghost" in STEPS
    from kvq.cli.main import main

    assert main(["list", "steps"]) == 0
    out = capsys.readouterr().out
    assert "ghost" not in out and "neg" not in out and "nsep" in out
    assert plugins._status["lazy"].state == "broken" and "neg" not in STEPS
    assert "negp" in PRESETS and kvq.build("nsep>int4")


def test_disable_named_plugins(fake_plugins, monkeypatch):
    monkeypatch.setenv("KVQ_DISABLE_PLUGINS", "other, good")
    status = fake_plugins(("good", good))
    assert status["good"].state == "disabled" and "neg" not in STEPS


def test_disable_all_plugins(fake_plugins, monkeypatch):
    monkeypatch.setenv("KVQ_DISABLE_PLUGINS", "1")
    status = fake_plugins(("good", good))
    assert list(status) == ["builtins"]


def test_working_plugin_round_trips(fake_plugins):
    status = fake_plugins(("good", good))
    assert status["good"].state == "ok" and status["good"].components == 1
    p = kvq.build("neg>ptok>int4")
    assert kvq.build(p.to_spec()) == p


def test_direct_registration_is_checked():
    from kvq.errors import KVQError
    from kvq.registry import Registry, check_step

    reg = Registry("step", check=check_step)
    with pytest.raises(KVQError, match="to_spec"):
        reg.register("negate", Neg)
    reg.register("neg", Neg)
    with pytest.raises(KVQError, match="bad default bits=5"):
        reg.register("int5", kvq.registry.STEPS.get("int"), defaults={"bits": 5})
