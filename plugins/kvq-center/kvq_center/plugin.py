"""The plugin module named by the ``kvq`` entry point."""

import kvq


@kvq.hookimpl
def kvq_register_steps(register):
    register("center", "kvq_center.center:Center")


@kvq.hookimpl
def kvq_register_presets(register):
    from kvq.presets import make_preset

    register("center4", lambda: make_preset("center4", "center>ptok>int4", "ptok>int4"))
