"""The numeric-edge fixes change nothing for ordinary inputs: every built-in preset stores the
same codes and metadata, bit for bit, as before them (digests from ``pin_codes.py``)."""

import json
from pathlib import Path

from pin_codes import digest, inputs, pins

PINNED = json.loads((Path(__file__).parent / "data" / "code_pins.json").read_text())


def test_presets_store_the_pinned_codes():
    # presets added after the pins (new formats) are not pinned; every pinned one must match
    now = pins({k.split("/")[0] for k in PINNED})
    assert set(now) == set(PINNED)
    changed = [k for k in PINNED if now[k] != PINNED[k]]
    assert not changed, f"{len(changed)} of {len(PINNED)} changed, e.g. {changed[:3]}"


def test_the_pins_can_fail():
    import kvq

    q = kvq.build("ptok>int4").quantize(inputs(64, 37, "fp32", 1.0).mul_(1.001))
    assert digest(q) != PINNED["naive4/k/64/37/fp32/1.0"]
