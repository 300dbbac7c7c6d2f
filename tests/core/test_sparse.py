"""Dense-and-sparse outliers: exact kept entries, the rest as the pipeline without them, sizes."""

import math
from types import SimpleNamespace

import pytest
import torch

import kvq
from kvq.testing import HEAD_DIMS, check_step, kv_like, sqnr_db


def reference_split(x: torch.Tensor, frac: float, over: str):
    """Independent reference: (mask of kept entries, x with them replaced by the median of the
    rest of their token (token) or channel (block, channel)). x: (B, H, T, D) fp32."""
    b, h, t, d = x.shape
    mask = torch.zeros_like(x, dtype=torch.bool)
    filled = x.clone()
    for i in range(b):
        for j in range(h):
            m = x[i, j]
            if over == "token":
                k = math.ceil(frac * d)
                for r in range(t):
                    keep = m[r].abs().argsort(descending=True)[:k]
                    mask[i, j, r, keep] = True
            else:
                k = math.ceil(frac * t * d)
                score = m.abs() if over == "block" else \
                    (m - m.mean(0)).abs() / m.std(0, correction=0)
                keep = score.flatten().argsort(descending=True)[:k]
                mask[i, j].view(-1)[keep] = True
            for r in range(t if over == "token" else d):
                line = m[r] if over == "token" else m[:, r]
                kept = mask[i, j, r] if over == "token" else mask[i, j, :, r]
                rest = line[~kept]
                fill = rest.median() if rest.numel() else torch.tensor(0.0)
                if over == "token":
                    filled[i, j, r, kept] = fill
                else:
                    filled[i, j, kept, r] = fill
    return mask, filled


@pytest.mark.parametrize("over, rest", [("token", "ptok>int3"), ("block", "pchan>int3"),
                                        ("channel", "nsep>pchan>int4"),
                                        ("channel", "group(8,token)>int2(asym)")])
def test_rest_is_the_pipeline_without_the_outliers(over, rest):
    x = kv_like(2, 2, 19, 64, seed=3)
    full = kvq.build(f"sparse(0.03,{over})>{rest}")
    mask, filled = reference_split(x, 0.03, over)
    q = full.quantize(x)
    assert int(q.meta["outlier_index"].numel()) == int(mask.sum())
    y = full.dequantize(q)
    y_rest = kvq.build(rest).roundtrip(filled)
    assert torch.equal(y[~mask], y_rest[~mask])
    assert torch.equal(y[mask], x[mask].half().float())


@pytest.mark.parametrize("dtype, store", [(torch.float16, "fp16"), (torch.bfloat16, "fp16"),
                                          (torch.float32, "fp32")])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("over", ["token", "block", "channel"])
def test_kept_entries_come_back_bit_exact(dtype, store, head_dim, over):
    x = kv_like(1, 3, 37, head_dim, dtype=dtype, seed=head_dim)
    p = kvq.build(f"sparse(0.01,{over},{store})>pchan>int2")
    q = p.quantize(x)
    y = p.dequantize(q)
    idx, vals = q.meta["outlier_index"].long(), q.meta["outlier_values"]
    if over != "token":
        x, y = x.flatten(2).unsqueeze(2), y.flatten(2).unsqueeze(2)
    assert torch.equal(y.gather(-1, idx), x.gather(-1, idx))
    assert torch.equal(vals.to(dtype), x.gather(-1, idx))
    assert (x.float().abs() > 0).all()  # the test would pass trivially on zeros


@pytest.mark.parametrize("spec, seq, head_dim, per_head_bits, index_dtype", [
    ("sparse(0.01)", 32, 64, 32 * 1 * (16 + 8), torch.uint8),           # ceil(0.64) = 1 / token
    ("sparse(0.01)", 5, 256, 5 * 3 * (16 + 8), torch.uint8),            # ceil(2.56) = 3
    ("sparse(0.01,token,fp32)", 3, 512, 3 * 6 * (32 + 16), torch.int16),
    ("sparse(0.01,block)", 32, 64, 21 * (16 + 16), torch.int16),         # ceil(20.48) = 21
    ("sparse(0.01,channel)", 4, 64, 3 * (16 + 8), torch.uint8),          # 256 positions
    ("sparse(0.001,block)", 300, 128, 39 * (16 + 32), torch.int32),      # 38400 positions
])
def test_bytes_are_counted_honestly(spec, seq, head_dim, per_head_bits, index_dtype):
    p = kvq.build(f"{spec}>ptok>int4")
    x = kv_like(2, 3, seq, head_dim)
    q = p.quantize(x)
    assert q.meta["outlier_index"].dtype == index_dtype
    assert p.steps[0].meta_bits(seq, head_dim) == per_head_bits
    assert q.nbytes == 2 * 3 * p.nbytes(seq, head_dim)
    plain = kvq.build("ptok>int4").bits_per_element(head_dim, seq)
    assert p.bits_per_element(head_dim, seq) == plain + per_head_bits / (seq * head_dim)


def test_outliers_tighten_the_range():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 256, 128, generator=g)
    spike = torch.randint(0, 128, (2, 4, 256, 1), generator=g)
    x.scatter_(-1, spike, 40.0)  # one spike per token, in a random channel
    assert (sqnr_db(x, kvq.build("sparse(0.02)>ptok>int3").roundtrip(x))
            > sqnr_db(x, kvq.build("ptok>int3").roundtrip(x)) + 6)


def test_spec_order_and_round_trip():
    p = kvq.build("sparse(0.01)>nsep>pchan>int3")
    assert [s.type for s in p.steps] == ["sparse", "nsep", "pchan", "int"]
    assert kvq.build(p.to_spec()) == p
    assert kvq.Pipeline.model_validate_json(p.model_dump_json()) == p
    assert p.to_spec() == "sparse(0.01)>nsep>pchan>int3"
    assert kvq.build("sparse(0.01,block)>pchan>int3").token_axis_stats
    assert not kvq.build("sparse(0.01)>ptok>int3").token_axis_stats


@pytest.mark.parametrize("bad", ["sparse(0)>int4", "sparse(0.7)>int4", "sparse(0.01,row)>int4",
                                 "pchan>sparse(0.01)>int4", "sparse>int4"])
def test_bad_specs_are_clear_errors(bad):
    with pytest.raises(kvq.SpecError):
        kvq.build(bad)


@pytest.mark.parametrize("over", ["token", "block", "channel"])
def test_conformance(over):
    check_step(f"sparse(0.01,{over})")


def test_triton_refuses_and_auto_falls_back_to_torch():
    from kvq.backends import get_backend, resolve_backend
    from kvq.backends.triton.plan import KernelPlan, Unsupported

    p = kvq.build("sparse(0.01)>pchan>int4")
    with pytest.raises(Unsupported, match="sparse"):
        KernelPlan.from_pipeline(p)
    with pytest.raises(kvq.BackendError, match="triton"):
        p.quantize(kv_like(1, 1, 8, 64), backend="triton")
    fake_cuda = SimpleNamespace(is_cuda=True, shape=(1, 1, 8, 64))
    assert resolve_backend("auto", p, fake_cuda) is get_backend("torch")
