"""Property tests over random shapes, dtypes and specs."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvq
from kvq.testing import sqnr_db

transforms = st.lists(st.sampled_from(["nsep", "rot", "nsep(renorm=false)", "nsep(bf16)"]),
                      max_size=2, unique_by=lambda s: s[:3])
granularities = st.sampled_from(["", "ptok", "pchan", "group(8)", "group(16,token)",
                                 "group(3,token)"])
quantizers = st.builds(lambda b, s: f"int{b}" + ("(asym)" if s else ""),
                       st.sampled_from([2, 3, 4, 8]), st.booleans())


@st.composite
def specs(draw):
    parts = draw(transforms) + [draw(granularities)] + [draw(quantizers)]
    return ">".join(p for p in parts if p)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs())
def test_random_specs_round_trip(spec):
    p = kvq.build(spec)
    assert kvq.build(p.to_spec()) == p
    assert kvq.Pipeline.model_validate_json(p.model_dump_json()) == p


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), batch=st.integers(1, 3), heads=st.integers(1, 3), seq=st.integers(2, 40),
       head_dim=st.sampled_from([8, 16, 24, 40, 64]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_random_pipelines_on_random_tensors(spec, batch, heads, seq, head_dim, dtype, scale, seed):
    p = kvq.build(spec)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, heads, seq, head_dim, generator=g) * scale).to(dtype)
    q = p.quantize(x)
    y = p.dequantize(q)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert q.nbytes == batch * heads * p.nbytes(seq, head_dim)
    floor = {2: -1.0, 3: 4.0, 4: 9.0, 8: 25.0}[p.bits]
    assert sqnr_db(x.float(), y.float()) > floor


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 5), d=st.integers(1, 70),
       seed=st.integers(0, 2**16))
def test_packing_is_exact(bits, rows, d, seed):
    from kvq.quantizers.packing import pack, unpack

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, d), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits, d), codes)
