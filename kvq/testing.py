"""A conformance suite every step (built-in or plugin) should pass; plugins reuse it unchanged.

>>> from kvq.testing import check_step
>>> check_step("nsep")            # doctest: +SKIP

Checks: spec/JSON round trip, shapes and dtypes through a full pipeline, transforms invert
exactly without a quantizer in between, odd head dims, zero vectors stay zero, NaN/Inf input
raises, fp16 input near the fp16 maximum stays finite. Quantizers are checked on their own.
"""

from __future__ import annotations

import torch

HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better)."""
    x, x_hat = x.double(), x_hat.double()
    noise = (x - x_hat).pow(2).sum().clamp_min(1e-300)
    return float(10 * torch.log10(x.pow(2).sum() / noise))


def edge_blocks() -> torch.Tensor:
    """(1, 1, 8, 64) edge cases for block formats (blocks of 32 channels): all-zero blocks, ties of
    |max| with opposite signs, a negative max, constants, exact halves, tiny and huge ranges."""
    r = torch.arange(32, dtype=torch.float32)
    rows = [
        torch.zeros(32),                                   # all-zero block
        torch.cat([torch.tensor([3.0, -3.0]), r[2:] / 20]),  # |max| tie: the first one wins
        torch.cat([torch.tensor([-3.0, 3.0]), -r[2:] / 20]),
        -r - 1,                                            # negative max
        torch.full((32,), 0.7),                            # constant block
        (r - 16) * 0.5,                                    # many values on exact halves
        torch.linspace(-1e-6, 1e-6, 32),                   # scale underflows fp16
        torch.randn(32, generator=torch.Generator().manual_seed(0)) * 1e4,
    ]
    x = torch.stack([torch.cat([a, a.flip(0) * 0.5]) for a in rows])
    return x.reshape(1, 1, 8, 64)


def kv_like(batch=1, heads=2, seq=64, head_dim=128, dtype=torch.float32, outliers=4,
            outlier_scale=20.0, norm_spread=4.0, seed=0) -> torch.Tensor:
    """Gaussian K/V-like data with planted outlier channels and token norm variation.

    Returns (batch, heads, seq, head_dim): ``outliers`` channels scaled by ``outlier_scale``
    and per-token norms varying by a factor ``norm_spread`` across tokens.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, seq, head_dim, generator=g)
    idx = torch.randperm(head_dim, generator=g)[:outliers]
    x[..., idx] *= outlier_scale
    spread = torch.exp(torch.rand(batch, heads, seq, 1, generator=g) * torch.log(
        torch.tensor(norm_spread)))
    return (x * spread).to(dtype)


def check_step(step: str, quantizer: str = "int8", *, transforms: str = "",
               min_sqnr: float = 25.0) -> None:
    """Run the conformance checks for the step spelled ``step`` (e.g. ``"nsep"``, ``"center"``).

    A transform or granularity is checked in front of ``quantizer``; a quantizer (``"lloyd4"``,
    or with its granularity, ``"group(16)>fp4(nv)"``) on its own, after ``transforms`` (e.g.
    ``"nsep>rot"``) if given. The pipeline must reach ``min_sqnr`` dB on K/V-like data.
    Non-finite input must raise :class:`kvq.NumericsError`; a quantizer on its own must return
    fp16 input near the fp16 maximum finite (or raise NumericsError).
    """
    import kvq

    is_quantizer = _role(step.split(">")[-1]) == "quantizer"
    spec = step if is_quantizer else f"{step}>{quantizer}"
    first = kvq.build(f"{transforms}>{spec}" if transforms else spec)
    again = kvq.build(first.to_spec())
    assert again == first, f"spec round trip changed {first.to_spec()!r}"
    assert kvq.Pipeline.model_validate_json(first.model_dump_json()) == first, "JSON round trip"
    for d in HEAD_DIMS:
        for dtype in DTYPES:
            x = kv_like(2, 3, 37, d, dtype=dtype)
            y = first.roundtrip(x)
            assert y.shape == x.shape and y.dtype == x.dtype, f"{first}: shape/dtype at D={d}"
            assert torch.isfinite(y).all(), f"{first}: non-finite output at D={d} {dtype}"
            assert sqnr_db(x.float(), y.float()) > min_sqnr, f"{first}: low SQNR at D={d} {dtype}"
        zeros = torch.zeros(1, 1, 5, d)
        assert torch.equal(first.roundtrip(zeros), zeros), f"{first}: zero vectors"
    _check_numerics(first, fp16_range=is_quantizer and not transforms)
    for t in first.transforms:
        x = kv_like(1, 2, 9, 96)
        h, meta = t.forward(x.clone())  # steps may work in place on their input
        assert torch.allclose(t.inverse(h, meta), x, rtol=1e-2, atol=1e-2 * x.abs().max()), \
            f"{t.to_spec()} does not invert"


def _check_numerics(p, fp16_range: bool) -> None:
    from kvq.errors import NumericsError

    for bad in (float("nan"), float("inf"), -float("inf")):
        x = kv_like(1, 2, 8, 64)
        x[0, 1, 3, 5] = bad
        try:
            p.quantize(x)
        except NumericsError:
            continue
        raise AssertionError(f"{p}: input holding {bad} did not raise NumericsError")
    if not fp16_range:
        return
    big = (kv_like(1, 2, 8, 64, outliers=0) * 1e4).clamp(-65504, 65504).half()
    try:
        y = p.roundtrip(big)
    except NumericsError:
        return
    assert torch.isfinite(y).all(), f"{p}: fp16 input near the fp16 maximum came back non-finite"


def _role(step: str) -> str:
    from kvq.spec.build import make_step

    return make_step(step).role
