"""The Triton backend has no kernels for the calibrated and KVQuant-class steps (klt, alloc, nuq,
sparse) yet: it refuses them with BackendError naming the step (``auto`` then uses the torch
reference), and the Triton decode attention leaves pre-RoPE and sink layers to the torch path."""

import sys
from pathlib import Path

import pytest
import torch

import kvq
from kvq.errors import BackendError

sys.path.insert(0, str(Path(__file__).parent.parent / "hf"))
from fitted import kvquant_specs, tc_spec, write_nuq, write_tc  # noqa: E402


def test_calibrated_steps_are_refused_by_name(tmp_path):
    tc = write_tc(tmp_path / "tc.safetensors", 1, 2, 16, 3)
    nq = write_nuq(tmp_path / "nq.safetensors", 1, 2, 16, 3)
    x = torch.randn(1, 2, 8, 16)
    for spec, step in [(tc_spec(tc, 0, "k", 3), "klt"), (tc_spec(tc, 0, "k", 3, nsep=False),
                                                          "klt"),
                       (f"nsep>alloc(3,source={tc}#L0.k)", "alloc"),
                       (kvquant_specs(nq, 0, 3)[0], "sparse"),
                       (f"ptok>nuq(3,source={nq}#L0.v)", "nuq")]:
        pipe = kvq.build(spec)
        with pytest.raises(BackendError, match=step):
            pipe.quantize(x, backend="triton")
        torch.testing.assert_close(pipe.roundtrip(x, backend="auto"),
                                   pipe.roundtrip(x, backend="torch"), atol=0, rtol=0)


def test_triton_decode_leaves_pre_rope_and_sink_layers_to_torch():
    from types import SimpleNamespace

    from kvq.hf.packed import StreamReader
    from kvq.hf.triton_decode import plans

    readers = (StreamReader(kvq.build("pchan>int4")), StreamReader(kvq.build("ptok>int4")))
    plain = SimpleNamespace(layer=SimpleNamespace(pre_rope=False, sinks=0), readers=readers)
    assert plans(plain) is not None
    for layer in (SimpleNamespace(pre_rope=True, sinks=0), SimpleNamespace(pre_rope=False,
                                                                           sinks=1)):
        assert plans(SimpleNamespace(layer=layer, readers=readers)) is None
