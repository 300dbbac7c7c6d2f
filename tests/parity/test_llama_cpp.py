"""llama.cpp's cache types with its automatic rotation (``q4_0-rot``, ``q4_1-rot``,
``q8_0-rot``) at every head_dim. Rows "llama.cpp q4_0/q4_1/q8_0 (+ -rot)" of docs/parity.md.

llama.cpp is C++; its rotation rule is transcribed from ggml-org/llama.cpp
``src/llama-kv-cache.cpp``
(``ggml_gen_hadamard``; ``attn_rot_k/v = quantized type && n_embd_head % 64 == 0``;
``build_input_k_rot``: ``nrot = 64; do nrot *= 2; while (n_embd_head_k % nrot == 0); nrot /= 2``;
``build_input_v_rot``: ``nrot = 64``) and ``src/llama-graph.cpp`` ``build_attn`` (k_cur and
v_cur multiplied by the rotation before ``cpy_k`` / ``cpy_v``). The formats run gguf-py's own
``gguf.quants`` (the Python reference of ggml-quants.c) on the rotated rows.
"""

import numpy as np
import pytest
import torch
from oracles import DTYPES, inputs

import kvq
from kvq.quantizers import unpack

gguf = pytest.importorskip("gguf")
FORMATS = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
           "q8_0": gguf.GGMLQuantizationType.Q8_0}
HEAD_DIMS = (64, 96, 128, 192, 256, 320, 384)  # all multiples of 32 (the block formats need it)


def ggml_gen_hadamard(n: int) -> torch.Tensor:
    """llama-kv-cache.cpp ggml_gen_hadamard: data[0] = 1/sqrtf(n), then quadrant doubling."""
    h = np.zeros((n, n), np.float32)
    h[0, 0] = np.float32(1.0) / np.sqrt(np.float32(n))
    s = 1
    while s < n:
        h[s:2 * s, :s], h[:s, s:2 * s], h[s:2 * s, s:2 * s] = h[:s, :s], h[:s, :s], -h[:s, :s]
        s *= 2
    return torch.from_numpy(h)


def llama_cpp_rotation(head_dim: int, which: str) -> torch.Tensor | None:
    """The (D, D) matrix llama.cpp multiplies K or V rows by, or None (no rotation)."""
    if head_dim % 64:
        return None  # attn_rot_k / attn_rot_v stay false
    nrot = 64
    if which == "k":
        while True:  # do { nrot *= 2; } while (n_embd_head_k_all % nrot == 0); nrot /= 2;
            nrot *= 2
            if head_dim % nrot:
                break
        nrot //= 2
    return torch.block_diag(*[ggml_gen_hadamard(nrot)] * (head_dim // nrot))


def gguf_codes(rows: torch.Tensor, fmt: str) -> torch.Tensor:
    """gguf.quants' codes for fp32 rows (N, D), as kvq stores them (q8_0: int8 + 128)."""
    raw = gguf.quants.quantize(rows.numpy(), FORMATS[fmt])
    blocks = raw.reshape(-1, {"q4_0": 18, "q4_1": 20, "q8_0": 34}[fmt])
    qs = blocks[:, 4 if fmt == "q4_1" else 2:]
    if fmt == "q8_0":
        codes = qs.view(np.int8).astype(np.int16) + 128
    else:
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return torch.from_numpy(codes.astype(np.uint8)).reshape(rows.shape)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_rotation_rule_is_llama_cpps(d):
    cfg = kvq.kv("q4_0-rot")
    for pipe, which in ((cfg.keys, "k"), (cfg.values, "v")):
        ref = llama_cpp_rotation(d, which)
        ours = pipe.transforms[0].matrix(d)
        assert torch.equal(ours, torch.eye(d) if ref is None else ref), which


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_codes_are_gguf_on_llama_cpps_rotated_rows(fmt, d):
    cfg = kvq.kv(f"{fmt}-rot")
    for dtype in DTYPES:
        for kind, x in inputs(d, dtype, seq=5).items():
            for pipe, which in ((cfg.keys, "k"), (cfg.values, "v")):
                r = llama_cpp_rotation(d, which)
                rows = x.float().reshape(-1, d)
                rows = rows if r is None else rows @ r
                q = pipe.quantize(x, backend="torch")
                got = unpack(q.codes, pipe.bits, d).reshape(-1, d)
                assert torch.equal(got, gguf_codes(rows, fmt)), f"{kind} {dtype} {which}"
                if r is None:  # llama.cpp runs the plain format: kvq stores the same codes
                    assert torch.equal(q.codes, kvq.kv(fmt).keys.quantize(x).codes)


@pytest.mark.parametrize("d", [96, 192])
def test_triton_kernel_agrees(d):
    """The Triton kernels (interpreted on CPU) run rot(ggml) with the same matrices."""
    pytest.importorskip("triton")
    cfg = kvq.kv("q4_0-rot")
    x = inputs(d, torch.float16, seq=5)["outliers"]
    for pipe in (cfg.keys, cfg.values):
        a, b = pipe.quantize(x, backend="torch"), pipe.quantize(x, backend="triton")
        assert torch.equal(a.codes, b.codes) and torch.equal(a.meta["scale"], b.meta["scale"])


def test_rot_ggml_spec_and_errors():
    p = kvq.build("rot(ggml,block=64)>q4_0")
    assert kvq.build(p.to_spec()) == p and p.to_spec() == "rot(ggml,block=64)>q4_0"
    x = inputs(96, torch.float32, seq=5)["edges"]
    assert torch.equal(p.transforms[0].forward(x)[0], x)  # no rotation at 96: every bit kept
    assert torch.equal(torch.signbit(p.transforms[0].forward(x)[0]), torch.signbit(x))
    with pytest.raises(kvq.KVQError, match="power-of-two block dividing head_dim 128"):
        kvq.build("rot(ggml,block=96)>q4_0").quantize(torch.randn(1, 1, 2, 128))
