"""Peer oracles for the parity tests: kvq's named methods against their namesakes' own code
(docs/parity.md).

``peer(name)`` imports a pinned, vendored peer file from ``tests/parity/peers/`` after checking
that its body (below the citation header) still has the sha256 the header records, so a test
can never run against an edited copy of the oracle.
"""

import hashlib
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from kvq.testing import kv_like

# vLLM's Triton store kernel runs on CPU in the Triton interpreter (set before triton.jit runs)
os.environ.setdefault("TRITON_INTERPRET", "1")

PEERS = Path(__file__).parent / "peers"


def peer(name: str, module: str | None = None):
    """The vendored peer module ``peers/<name>.py`` (imported as ``module``), its recorded hash
    checked (excerpts, which have no ``# Change:`` line, are verbatim copies of a few
    functions)."""
    path = PEERS / f"{name}.py"
    text = path.read_bytes()
    header, sep, body = text.partition(b"# Change: ")
    if sep:
        body = body.split(b"\n", 1)[1]
        recorded = re.search(rb"file sha256 ([0-9a-f]{64})", header).group(1).decode()
        assert hashlib.sha256(body).hexdigest() == recorded, f"{path.name} was edited"
    spec = importlib.util.spec_from_file_location(module or f"kvq_peer_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def vllm_store_module():
    """vLLM's ``triton_turboquant_store`` module, its two ``vllm`` imports provided by stubs:
    ``vllm.triton_utils`` is triton itself; ``_use_fp8_e4b15`` answers 0 (SM >= 8.9: e4nv)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    stubs = {"vllm": types.ModuleType("vllm"),
             "vllm.triton_utils": types.ModuleType("vllm.triton_utils"),
             "vllm.v1.attention.ops.triton_turboquant_decode":
                 types.ModuleType("vllm.v1.attention.ops.triton_turboquant_decode")}
    stubs["vllm.triton_utils"].tl, stubs["vllm.triton_utils"].triton = tl, triton
    stubs["vllm.v1.attention.ops.triton_turboquant_decode"]._use_fp8_e4b15 = lambda device=0: 0
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        return peer("vllm_triton_turboquant_store")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


HEAD_DIMS = (64, 96, 128, 192, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def inputs(head_dim: int, dtype=torch.float32, seq: int = 33, seed: int = 0) -> dict:
    """The parity inputs, each (1, 2, seq, head_dim) in ``dtype``: Gaussian, heavy-tailed
    (Student t, 2 degrees of freedom), per-channel outliers, exact ties (integers, halves of
    every quantizer step), near ties (one ulp off), tiny and all-zero rows, a -0.0 row, blocks
    of 16 channels 1e-7..1 times the rest."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, 2, seq, head_dim)
    z, z1, z2 = (torch.randn(shape, generator=g) for _ in range(3))
    out = {
        "gaussian": torch.randn(shape, generator=g),
        "heavy": (z / ((z1 * z1 + z2 * z2) / 2).sqrt()).clamp(-1e3, 1e3),  # Student t, 2 dof
        "outliers": kv_like(1, 2, seq, head_dim, seed=seed),
    }
    ties = torch.randint(-30, 31, shape, generator=g).float() / 2
    out["ties"] = ties
    out["near_ties"] = torch.nextafter(ties, torch.full_like(ties, 100.0))
    edge = torch.randn(shape, generator=g)
    edge[..., 0, :] = 0.0
    edge[..., 1, :] = -0.0
    edge[..., 2, :] *= 1e-3
    edge[..., 3, :] = 0.25  # constant rows
    edge[..., 4, : head_dim // 2] = 0.0  # half-zero rows (zero blocks)
    out["edges"] = edge
    # blocks of 16 channels far below the head's absmax (scaled by 1e-7 .. 1)
    span = 10 ** (-7 * torch.rand((1, 2, seq, head_dim // 16, 1), generator=g))
    out["scaled_blocks"] = (torch.randn(shape, generator=g).reshape(*shape[:3], -1, 16)
                            * span).reshape(shape)
    return {k: v.to(dtype) for k, v in out.items()}


def modelopt_nvfp4():
    """ModelOpt 0.47's ``NVFP4QTensor`` (vendored ``qtensor/nvfp4_tensor.py``), its relative
    imports served by a stand-in package: ``utils`` = the vendored excerpt of core_utils.py plus
    numeric_utils.py, ``backends.utils.fp4_compatible`` = False (no TensorRT-LLM here),
    ``qtensor.base_qtensor.BaseQuantizedTensor`` = a holder of the quantized data."""
    root = "kvq_peer_modelopt"
    if f"{root}.qtensor.nvfp4_tensor" in sys.modules:
        return sys.modules[f"{root}.qtensor.nvfp4_tensor"].NVFP4QTensor
    for pkg in ("", ".backends", ".qtensor", ".utils"):
        mod = types.ModuleType(root + pkg)
        mod.__path__ = []
        sys.modules[root + pkg] = mod
    utils = sys.modules[f"{root}.utils"]
    vars(utils).update({k: v for k, v in vars(peer("modelopt_core_utils_excerpt")).items()
                        if k.startswith("reduce_")})
    peer("modelopt_numeric_utils", f"{root}.utils.numeric_utils")
    backends = types.ModuleType(f"{root}.backends.utils")
    backends.fp4_compatible = lambda: False
    base = types.ModuleType(f"{root}.qtensor.base_qtensor")

    class BaseQuantizedTensor:
        def __init__(self, original_shape, original_dtype, quantized_data):
            self._quantized_data = quantized_data

    base.BaseQuantizedTensor = BaseQuantizedTensor
    sys.modules.update({backends.__name__: backends, base.__name__: base})
    return peer("modelopt_nvfp4_tensor", f"{root}.qtensor.nvfp4_tensor").NVFP4QTensor
