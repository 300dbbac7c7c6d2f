"""KVQuant's nuq arithmetic against KVQuant's own ``quant_fn_nuq_recon`` (row "KVQuant nuq" of
docs/parity.md).

KVQuant's repository has no license file, so its code is not vendored: the test runs the file
``quant/kvquant/simquant_module_quantizer.py`` of SqueezeAILab/KVQuant at commit
57a238357f0ffe50084670fcd5781c9848f80ea2 from the path in ``KVQ_KVQUANT_FILE`` (its sha256 is
checked) and skips without it (or without scikit-learn, which the file imports). In CI::

    git -C /tmp clone -q https://github.com/SqueezeAILab/KVQuant && git -C /tmp/KVQuant checkout \\
        -q 57a2383 && KVQ_KVQUANT_FILE=/tmp/KVQuant/quant/kvquant/simquant_module_quantizer.py ...
"""

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from oracles import DTYPES, HEAD_DIMS, inputs

import kvq
from kvq import codebooks

SHA256 = "43513d3abc431759f7c4b53f718f2d87ed79ba88a1bc3df52bff5319fdd60046"
LEVELS = torch.tensor([-1.0, -0.62, -0.31, -0.07, 0.12, 0.36, 0.68, 1.0])  # a 3-bit LUT


@pytest.fixture(scope="module")
def simquant():
    path = os.environ.get("KVQ_KVQUANT_FILE")
    if not path:
        pytest.skip("KVQ_KVQUANT_FILE is not set (KVQuant@57a2383's simquant_module_quantizer.py)")
    pytest.importorskip("sklearn")
    data = Path(path).read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256, f"{path} is not KVQuant@57a2383's file"
    spec = importlib.util.spec_from_file_location("kvquant_simquant", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    path = tmp_path_factory.mktemp("kvquant") / "lut.safetensors"
    codebooks.write(path, {"L0.v": LEVELS, "L0.k": LEVELS.clone()}, {"bits": "3"})
    return path


def _static(path: Path, upper: torch.Tensor, lower: torch.Tensor) -> Path:
    """A codebook file with static key scales from per-(head, channel) thresholds (H, D)."""
    codebooks.write(path, {"L0.k": LEVELS.clone(), "L0.k.zero": (upper + lower) / 2,
                           "L0.k.scale": (upper - lower) / 2}, {"bits": "3"})
    return path


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_per_token_nuq_is_quant_fn_nuq_recon(simquant, book, d, dtype):
    """Values: per-token min-max normalization, nearest LUT level (dynamicquantization)."""
    p = kvq.build(f"ptok>nuq(3,source={book}#L0.v,dtype=fp32)")
    for kind, x in inputs(d, dtype).items():
        rows = x.float().reshape(-1, d)
        theirs = simquant.quant_fn_nuq_recon(rows.clone(), bits=3, qchannel=-1,
                                             dynamicquantization=True, lut=[LEVELS.numpy()])
        ours = p.roundtrip(x.float()).reshape(-1, d)
        assert torch.equal(ours, theirs), f"{kind}: {(ours != theirs).float().mean():.3%} differ"


@pytest.mark.parametrize("d", [64, 128, 256])
def test_static_key_scales_are_quant_fn_nuq_recon(simquant, tmp_path, d):
    """Keys: calibrated per-channel thresholds (maxval / minval), entries beyond them coded to
    the outer levels (without outlier removal)."""
    x = inputs(d, torch.float16, seq=64)["outliers"].float()
    upper = torch.quantile(x, 0.995, dim=-2)[0]  # (H, D): KVQuant's 99.5 / 0.5 percentiles
    lower = torch.quantile(x, 0.005, dim=-2)[0]
    p = kvq.build(f"nuq(3,scale=static,source={_static(tmp_path / 'k.safetensors', upper, lower)}"
                  "#L0.k)")
    ours = p.roundtrip(x)
    for h in range(x.shape[1]):
        theirs = simquant.quant_fn_nuq_recon(x[0, h].clone(), bits=3, qchannel=0,
                                             maxval=upper[h], minval=lower[h],
                                             lut=[LEVELS.numpy()])
        assert torch.equal(ours[0, h], theirs), f"head {h}"
