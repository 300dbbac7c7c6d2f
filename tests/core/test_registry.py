"""The registry: lazy targets, loud collisions, did-you-mean; built-ins load through pluggy."""

import pytest

from kvq.errors import KVQError, SpecError
from kvq.plugins import plugin_manager
from kvq.registry import BACKENDS, STEPS, Registry


def test_builtins_register_through_the_plugin_hook():
    pm = plugin_manager()
    assert pm.get_plugin("builtins") is not None
    impls = [i.plugin_name for i in pm.hook.kvq_register_steps.get_hookimpls()]
    assert "builtins" in impls
    for name in ("nsep", "pchan", "ptok", "group", "rot", "int2", "int3", "int4", "int8", "none"):
        assert name in STEPS


def test_lazy_targets_resolve_on_use():
    reg = Registry("thing")
    reg.register("odict", "collections:OrderedDict")
    assert isinstance(reg._entries["odict"].target, str)
    from collections import OrderedDict

    assert reg.get("odict") is OrderedDict


def test_collisions_are_loud():
    reg = Registry("thing")
    reg.register("a", object, source="one")
    with pytest.raises(KVQError, match="'a' from 'two' collides with the one from 'one'"):
        reg.register("a", object, source="two")


def test_did_you_mean():
    with pytest.raises(SpecError, match="did you mean 'pchan'"):
        STEPS.get("pchn")
    with pytest.raises(SpecError, match="did you mean 'triton'"):
        BACKENDS.get("trition")


def test_explicit_triton_request_explains_itself():
    """On a CPU tensor without the interpreter, asking for Triton names the reason."""
    import os
    import subprocess
    import sys

    code = ("import torch, kvq\n"
            "try:\n"
            "    kvq.build('ptok>int4').quantize(torch.randn(1, 1, 4, 64), backend='triton')\n"
            "except kvq.BackendError as e:\n"
            "    print('BackendError:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "BackendError: backend 'triton' cannot run 'ptok>int4'" in proc.stdout, proc.stderr


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = ("import sys, kvq; kvq.build('nsep>pchan>int4');"
            "bad = [m for m in ('triton', 'transformers', 'lm_eval') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("step", ["nsep", "rot", "ptok", "pchan", "group(16)", "group(8,token)"])
def test_builtin_steps_pass_the_conformance_suite(step):
    from kvq.testing import check_step

    check_step(step)
