"""The TurboQuant / FP8 / FP4 presets: bit-width families and the bits each stores (their parity
with vLLM's and ModelOpt's code is in tests/parity/)."""


import pytest

import kvq


def test_turboquant_family_bits_with_compare():
    from kvq.eval import pipelines

    got = pipelines.expand(["turboquant4"], [4, 3, 2])
    assert list(got) == ["fp16", "turboquant4", "turboquant3", "turboquant2"]
    spec = pipelines.expand(["nsep>rot>lloyd4(none)"], [3])
    assert [c.keys.to_spec() for c in spec.values()][1] == "nsep>rot>lloyd3(none)"
    with pytest.raises(kvq.KVQError, match="no 8-bit variant"):
        pipelines.expand(["turboquant4"], [8])


@pytest.mark.parametrize("name, b64, b128", [
    ("fp8", 8 + 32 / 2048, 8 + 32 / 4096), ("fp8-e5m2", 8 + 32 / 2048, 8 + 32 / 4096),
    ("nvfp4", 4.5 + 32 / 2048, 4.5 + 32 / 4096), ("mxfp4", 4.25, 4.25),
])
def test_hardware_float_presets_bits_per_32_token_block(name, b64, b128):
    cfg = kvq.kv(name)
    assert cfg.bits_per_element(64, 32) == b64 and cfg.bits_per_element(128, 32) == b128
