"""Split-K Triton decode attention == the torch fast path == SDPA over the dequantized cache.

Runs in the Triton interpreter on CPU (conftest sets TRITON_INTERPRET=1): small layers, small
tiles and splits so that several splits, segments and tiles are merged; one case per code width.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

import kvq  # noqa: E402
from kvq.hf.decode import FastDecode  # noqa: E402
from kvq.hf.flash_decode import decode_attention  # noqa: E402
from kvq.hf.layer import KVQLayer  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("0", "")
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"

from kvq.hf.triton_decode import (  # noqa: E402
    triton_decode_attention,
    triton_decode_supported,
)


class _Config:
    _attn_implementation = "kvq"


def decode_view(spec, b=2, h=2, d=32, prompt=45, steps=7, sliding=None, seed=0):
    """A layer holding prompt + steps tokens (a prefill tail segment, decode flushes) and the
    tagged window of its last decode step."""
    gen = torch.Generator().manual_seed(seed)
    p = kvq.build(spec)
    layer = KVQLayer(p, p, residual=5, block=16, sliding_window=sliding, layer_idx=0)
    layer.fast = FastDecode(p, p, _Config())
    layer.update(torch.randn(b, h, prompt, d, generator=gen).to(DEVICE),
                 torch.randn(b, h, prompt, d, generator=gen).to(DEVICE))
    for _ in range(steps):
        kw, vw = layer.update(torch.randn(b, h, 1, d, generator=gen).to(DEVICE),
                              torch.randn(b, h, 1, d, generator=gen).to(DEVICE))
    return kw._kvq_view, (kw, vw)


@pytest.mark.parametrize("spec,sliding", [
    ("nsep>pchan>int4", None),
    ("rot>ptok>int2(asym)", None),
    ("group(8,token)>int3", 40),  # the window starts inside the first block (nothing dropped yet)
    ("group(8,token)>int3", 20),  # the prompt blocks left the window: dropped
    ("nsep>group(16)>int8(asym)", None),
])
def test_triton_decode_equals_torch_path(spec, sliding):
    view, window = decode_view(spec, sliding=sliding)
    assert triton_decode_supported(view)
    # prompt blocks + tail, then decode blocks; a 20-token window has dropped the prompt's
    assert len(view.layer.k_store.segments) == (1 if sliding == 20 else 2)
    assert (view.layer.dropped > 0) == (sliding == 20)
    g = 3
    q = torch.randn(2, 2 * g, 1, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones(2, 1, 1, view.visible, dtype=torch.bool, device=DEVICE)
    mask[1, ..., :4] = False  # left padding of row 1
    ref = decode_attention(q, view, window, mask, 0.2)
    got = triton_decode_attention(q, view, window, mask, 0.2, per_split=16, bt=16)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    k, v = view.materialize()
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2,
                                                            enable_gqa=True)
    torch.testing.assert_close(got, sdpa, atol=2e-6, rtol=1e-5)


def test_identity_pipeline_has_no_kernel():
    view, _ = decode_view("none", steps=1)
    assert not triton_decode_supported(view)
