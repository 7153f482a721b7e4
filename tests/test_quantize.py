"""The quantizer's math: error bounds, unbiasedness, the grid, and edge cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import q8
from q8.quantize import encode, levels

shapes = st.lists(st.integers(1, 7), min_size=1, max_size=4)


def step_of(lo, hi, bits):
    return (hi - lo) / levels(bits)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, bits=st.integers(1, 16), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31))
def test_nearest_error_at_most_half_a_step_and_on_grid(shape, bits, scale, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    q = q8.quantize(x, bits)
    lo, hi = x.min(), x.max()
    s = step_of(lo, hi, bits)
    assert (q - x).abs().max() <= s / 2 * (1 + 1e-9) + 1e-12
    if s > 0:
        k = (q - lo) / s
        assert (k - k.round()).abs().max() < 1e-6
        assert k.min() >= -1e-9 and k.max() <= levels(bits) + 1e-6


@settings(max_examples=40, deadline=None)
@given(shape=shapes, bits=st.integers(1, 16), seed=st.integers(0, 2**31))
def test_stochastic_error_below_one_step(shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    q = q8.quantize(x, bits, rounding="stochastic", generator=g)
    s = step_of(x.min(), x.max(), bits)
    assert (q - x).abs().max() < s + 1e-12
    if s > 0:
        k = (q - x.min()) / s
        assert (k - k.round()).abs().max() < 1e-6


@pytest.mark.parametrize("bits", [2, 8])
def test_stochastic_rounding_is_unbiased(bits):
    # Values strictly inside [lo, hi]: the mean of many draws converges to x (4-sigma bound).
    x = torch.linspace(-1, 1, 101, dtype=torch.float64)
    draws = 20000
    xs = x.expand(draws, -1)
    q = q8.quantize(xs, bits, rounding="stochastic", lo=-1.0, hi=1.0, generator=torch.Generator().manual_seed(1))
    s = 2.0 / levels(bits)
    bias = (q.mean(0) - x).abs().max()
    assert bias < 4 * (s / 2) / math.sqrt(draws)
    # and nearest rounding is biased on the same values, so the check can fail
    qn = q8.quantize(xs, bits, lo=-1.0, hi=1.0)
    assert (qn.mean(0) - x).abs().max() > 4 * (s / 2) / math.sqrt(draws)


def test_idempotent_with_fixed_range():
    x = torch.randn(1000)
    once = q8.quantize(x, 8, lo=-2.0, hi=2.0)
    assert torch.equal(q8.quantize(once, 8, lo=-2.0, hi=2.0), once)
    twice = q8.quantize(q8.quantize(x, 5), 5)
    assert torch.allclose(twice, q8.quantize(x, 5), atol=1e-6)


def test_zero_range_gives_the_value_not_nan():
    x = torch.full((3, 4), 2.5)
    for rounding in ("nearest", "stochastic"):
        assert torch.equal(q8.quantize(x, 8, rounding=rounding), x)
        assert torch.equal(q8.quantize(torch.zeros(5), 8, rounding=rounding), torch.zeros(5))
    # an explicit zero range maps everything to it
    assert torch.equal(q8.quantize(torch.randn(10), 8, lo=1.0, hi=1.0), torch.ones(10))


def test_explicit_range_clips():
    q = q8.quantize(torch.tensor([-5.0, 0.0, 5.0, math.inf, -math.inf]), 8, lo=-1.0, hi=1.0)
    ends = torch.tensor([-1.0, 1.0, 1.0, -1.0])
    assert torch.allclose(q[[0, 2, 3, 4]], ends, atol=1e-6)  # lo + 255 * step is hi up to rounding
    assert abs(q[1]) <= 1 / 255


def test_non_finite_input_propagates_as_nan():
    for bad in (math.nan, math.inf, -math.inf):
        x = torch.tensor([0.0, 1.0, bad, 3.0])
        assert torch.isnan(q8.quantize(x, 8)).all(), bad
        assert torch.isnan(q8.quantize(x, 8, rounding="stochastic")).all(), bad
    # with an explicit range, NaN stays where it was and the rest is quantized
    q = q8.quantize(torch.tensor([0.5, math.nan]), 8, lo=0.0, hi=1.0)
    assert torch.isnan(q[1]) and abs(q[0] - 0.5) <= 0.5 / 255


@pytest.mark.parametrize("shape", [(0,), (3, 0, 5), (), (1,), (7, 1, 3)])
def test_empty_scalar_and_odd_shapes(shape):
    x = torch.randn(shape)
    q = q8.quantize(x, 8)
    assert q.shape == x.shape and torch.isfinite(q).all()


def test_one_bit_has_two_levels_and_sixteen_bits_is_fine():
    x = torch.randn(1000)
    q1 = q8.quantize(x, 1)
    assert torch.allclose(q1.unique(), torch.stack([x.min(), x.max()]), atol=1e-6)
    q16 = q8.quantize(x.double(), 16)
    assert (q16 - x.double()).abs().max() <= step_of(x.min(), x.max(), 16) / 2 + 1e-12


@pytest.mark.parametrize("bits", [0, 17, True, 8.0, "8"])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        q8.quantize(torch.randn(3), bits)


def test_bad_rounding_and_inverted_range_raise():
    with pytest.raises(ValueError, match="rounding"):
        q8.quantize(torch.randn(3), 8, rounding="up")
    with pytest.raises(ValueError, match="lo=2"):
        q8.quantize(torch.randn(3), 8, lo=2.0, hi=1.0)


def test_straight_through_gradient():
    x = torch.randn(10, requires_grad=True)
    g = torch.randn(10)
    q8.quantize(x, 3, rounding="stochastic").backward(g)
    assert torch.equal(x.grad, g)


def test_generator_makes_stochastic_rounding_reproducible():
    x = torch.randn(1000)
    a = q8.quantize(x, 4, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    b = q8.quantize(x, 4, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    c = q8.quantize(x, 4, rounding="stochastic", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_compact_codes_dequantize_to_the_same_values():
    x = torch.randn(4, 33)
    lo, hi = q8.tensor_range(x)
    for bits, dtype in ((8, torch.uint8), (4, torch.uint8), (12, torch.int32)):
        c = encode(x, bits, lo, hi, compact=True)
        assert c.codes.dtype == dtype
        assert torch.equal(c.dequantize(), encode(x, bits, lo, hi).dequantize())


def test_half_precision_keeps_dtype():
    x = torch.randn(100).half()
    q = q8.quantize(x, 8)
    assert q.dtype == torch.float16 and (q.float() - x.float()).abs().max() < 0.02


def test_range_helpers():
    x = torch.tensor([[[1.0, -2.0]], [[3.0, 0.0]]])  # two samples
    lo, hi = q8.sample_mean_range(x)
    assert lo.item() == -1.0 and hi.item() == 2.0
    w = torch.randn(5, 3, 2, 2)
    lo, hi = q8.channel_range(w)
    assert lo.shape == (5, 1, 1, 1) and torch.equal(hi.flatten(), w.flatten(1).amax(1))
    q = q8.quantize(w, 8, lo=lo, hi=hi)
    step = (hi - lo) / 255
    assert ((q - w).abs() <= step / 2 + 1e-7).all()


def test_quantize_grad_survives_an_inplace_relu():
    x = torch.randn(50, requires_grad=True)
    y = q8.quantize_grad(x * 1.0, 2)
    torch.relu_(y)
    g = torch.linspace(-1, 1, 50)
    y.backward(g)
    # the hook quantizes the gradient of y's value before the in-place ReLU, i.e. after
    # ReLU's backward: g * (x > 0), on a 2-bit (4-level) grid over its own range
    masked = g * (x.detach() > 0)
    levels4 = torch.linspace(float(masked.min()), float(masked.max()), 4)
    assert all(torch.isclose(v, levels4, atol=1e-6).any() for v in x.grad)
    assert (x.grad - masked).abs().max() < (levels4[1] - levels4[0])


@pytest.mark.parametrize("bits,rounding", [(8, "nearest"), (8, "stochastic"), (16, "stochastic"), (1, "nearest")])
@pytest.mark.parametrize("size", [1e-40, 1e-38, 1e-37, 1e-30])
def test_tiny_ranges_give_finite_values_on_the_grid(bits, rounding, size):
    """A step below the smallest normal float has no finite inverse; dividing by it works.
    (Subnormal steps carry few significant bits: values land on the grid within 0.5% of the range.)"""
    x = torch.tensor([0.0, size, -0.5 * size, 0.25 * size])
    q = q8.quantize(x, bits, rounding=rounding)
    assert torch.isfinite(q).all(), q
    lo, hi = x.min(), x.max()
    slack = 5e-3 * (hi - lo) + 1e-44
    assert (q >= lo - slack).all() and (q <= hi + slack).all()
    assert (q - x).abs().max() <= (hi - lo) * (1.0 if rounding == "stochastic" else 0.5) / levels(bits) + slack


def test_half_precision_input_draws_full_precision_noise():
    """A float16 or bfloat16 draw has too few bits: frac(256 u), the 16-bit copy's dither,
    would be 0 for most bfloat16 draws (mean 0.17, not 0.5)."""
    from q8.quantize import uniform_noise

    for dtype in (torch.float16, torch.bfloat16):
        u = uniform_noise(torch.empty(200_000, dtype=dtype)).clone()
        assert u.dtype == torch.float32
        dither = (u * 256).frac()
        assert abs(dither.mean().item() - 0.5) < 0.005 and (dither == 0).float().mean() < 0.001
        g = torch.full((200_000,), 0.3, dtype=dtype)  # a 16-bit copy of half-precision values stays unbiased
        q = q8.quantize(g.float(), 16, rounding="stochastic", lo=-1.0, hi=1.0)
        assert abs(q.mean().item() - g.float()[0].item()) < 2.0 / levels(16)


def test_own_rounding_stream_per_seed_and_rank():
    x = torch.rand(10_000)
    draws = {}
    for seed, rank in ((0, 0), (0, 1), (0, 0)):
        q8.seed_rounding(seed, rank)
        torch.manual_seed(0)  # the default generator plays no part once a rounding seed is set
        draws.setdefault((seed, rank), []).append(q8.quantize(x, 4, rounding="stochastic", lo=0.0, hi=1.0) - x)
    q8.seed_rounding(None)
    a, b = draws[0, 0]
    assert torch.equal(a, b)  # one seed, one result
    c = draws[0, 1][0]
    assert abs(torch.corrcoef(torch.stack([a, c]))[0, 1]) < 0.05  # another rank: independent errors
    torch.manual_seed(3)
    d = q8.quantize(x, 4, rounding="stochastic", lo=0.0, hi=1.0)
    torch.manual_seed(3)
    assert torch.equal(d, q8.quantize(x, 4, rounding="stochastic", lo=0.0, hi=1.0))  # unseeded: torch's generator
