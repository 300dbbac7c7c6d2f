"""The plugin passes kvq's conformance suite and is found through its entry point."""

import torch

import kvq
from kvq.testing import check_step, kv_like, sqnr_db


def test_conformance():
    check_step("center")


def test_registered_through_entry_point():
    from kvq.registry import PRESETS, STEPS

    assert STEPS.entry("center").source == "center"
    assert "center4" in PRESETS


def test_centering_helps_offset_channels():
    x = kv_like(1, 2, 256, 64, outliers=0) + torch.linspace(-20, 20, 64)  # per-channel offsets
    assert sqnr_db(x, kvq.build("center>ptok>int4").roundtrip(x)) > \
        sqnr_db(x, kvq.build("ptok>int4").roundtrip(x)) + 6
