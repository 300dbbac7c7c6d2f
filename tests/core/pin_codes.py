"""Digests of the codes and metadata every preset stores for fixed normal-range inputs.

``python tests/core/pin_codes.py > tests/core/data/code_pins.json`` was run on the code before
the numeric-edge fixes of issue 12; ``test_code_pins.py`` checks that they still match, so the
fixes (scale rounding, underflow checks, output saturation) change nothing for ordinary inputs.
"""

from __future__ import annotations

import hashlib
import json

import torch

import kvq

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CASES = [(head_dim, seq, dtype, scale) for head_dim in (64,) for seq in (37,)
         for dtype in DTYPES for scale in (0.05, 1.0, 30.0)]


def inputs(head_dim: int, seq: int, dtype: str, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(head_dim * 1000 + seq)
    x = torch.randn(2, 3, seq, head_dim, generator=g) * scale
    x[..., 3] *= 8  # an outlier channel
    return x.to(DTYPES[dtype])


def digest(q) -> str:
    h = hashlib.sha256()
    for t in (q.codes, *(q.meta[k] for k in sorted(q.meta))):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def pins(names: set[str] | None = None) -> dict[str, str]:
    """Digests for every built-in preset, or only the presets in ``names``."""
    out = {}
    from kvq.registry import PRESETS

    for entry in PRESETS.entries():
        if entry.source != "kvq" or (names is not None and entry.name not in names):
            continue
        name, cfg = entry.name, entry.load()()
        for role, p in (("k", cfg.keys), ("v", cfg.values)):
            if p.is_identity:
                continue
            for head_dim, seq, dtype, scale in CASES:
                try:
                    p.granularity.check(torch.Size([1, 1, seq, head_dim]))
                except kvq.KVQError:
                    continue
                key = f"{name}/{role}/{head_dim}/{seq}/{dtype}/{scale}"
                out[key] = digest(p.quantize(inputs(head_dim, seq, dtype, scale), "torch"))
    return out


if __name__ == "__main__":
    print(json.dumps(pins(), indent=0, sort_keys=True))
