"""Fidelity figures: cosine / SQNR, the paper's angle bound, and the per-layer report."""

import math

import pytest
import torch

import q8
from q8.diagnostics import KINDS, summarize
from q8.models import build


def test_cosine_and_sqnr_values():
    a = torch.tensor([1.0, 0.0])
    assert q8.cosine(a, a) == pytest.approx(1.0)
    assert q8.cosine(a, torch.tensor([0.0, 2.0])) == pytest.approx(0.0)
    assert q8.cosine(torch.zeros(3), torch.zeros(3)) == 1.0
    assert q8.sqnr_db(a, a) == math.inf
    assert q8.sqnr_db(torch.tensor([10.0, 0.0]), torch.tensor([9.0, 0.0])) == pytest.approx(20.0)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("n", [1_000, 100_000])
def test_angle_bound_holds_for_gaussian_tensors(bits, n):
    w = torch.randn(n, dtype=torch.float64)
    cos = q8.cosine(w, q8.quantize(w, bits))
    bound = q8.cosine_bound(bits, n)
    assert cos >= bound
    print(f"M={bits} N={n}: cos={cos:.4f} >= bound={bound:.4f}")


def test_layer_fidelity_reports_every_layer_and_has_no_side_effects():
    model = q8.convert(build("resnet20", in_channels=1), q8.QuantConfig())
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    model(x)  # initialize running ranges
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rows = q8.layer_fidelity(model, x, y)
    layers = {r["layer"] for r in rows}
    assert len(layers) == 22 and {r["kind"] for r in rows} == set(KINDS)
    # conv1 gets no input gradient (its input does not require grad), so no layer_grad row
    assert not any(r["layer"] == "conv1" and r["kind"] == "layer_grad" for r in rows)
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    assert all(p.grad is None for p in model.parameters())
    s = summarize(rows)
    assert s["weight"]["cosine"] > 0.999 and s["activation"]["cosine"] > 0.99
    # at the top layer both passes see the same loss gradient up to 8-bit noise
    top = [r for r in rows if r["layer"] == "fc" and r["kind"] == "layer_grad"][0]
    assert top["shadow_cosine"] > 0.99


def test_more_bits_more_fidelity():
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    cos = {}
    for bits in (2, 8):
        torch.manual_seed(0)
        cfg = q8.QuantConfig(weight_bits=bits, act_bits=bits, grad_bits=bits, grad_weight_bits=bits)
        rows = q8.layer_fidelity(q8.convert(build("resnet20", in_channels=1), cfg), x, y)
        cos[bits] = summarize(rows)
    for kind in KINDS:
        assert cos[2][kind]["cosine"] < cos[8][kind]["cosine"], kind


@pytest.mark.parametrize("seeded", [False, True])
def test_layer_fidelity_leaves_every_random_stream_where_it_was(seeded):
    """Diagnostics draw rounding noise; the training stream must not notice (default generator
    or q8's own rounding stream)."""
    model = q8.convert(build("resnet20", in_channels=1, width=4), q8.QuantConfig())
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    draws = []
    for with_diagnostics in (False, True):
        q8.seed_rounding(5 if seeded else None)
        torch.manual_seed(1)
        if with_diagnostics:
            q8.layer_fidelity(model, x, y)
        draws.append((torch.rand(3), q8.quantize(torch.rand(1000) * 0 + 0.5, 4, rounding="stochastic", lo=0.0, hi=1.0)))
    q8.seed_rounding(None)
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])


def test_collapse_depth_range_bn_scales_and_depth_figure():
    from q8.diagnostics import collapse_depth, depth_profile_figure, range_bn_scales

    rows = [dict(layer=f"l{i}", kind="layer_grad", shadow_cosine=c) for i, c in enumerate([1.0, 0.95, 0.5, 0.2])]
    rows += [dict(layer=f"l{i}", kind="activation", shadow_cosine=0.99) for i in range(4)]
    depth = collapse_depth(rows)
    assert depth["layer_grad"] == 2 and depth["activation"] == -1
    assert depth_profile_figure(rows).axes[0].get_lines()
    torch.manual_seed(0)
    model = q8.convert(build("resnet20", in_channels=1, width=4), q8.QuantConfig(range_bn_chunks=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scales = range_bn_scales(model, torch.randn(16, 1, 16, 16))
    assert len(scales) == 21 and all(0.3 < r["sigma_ratio_mean"] < 3 for r in scales)
    assert all(torch.allclose(v.double(), before[k].double(), rtol=0, atol=0, equal_nan=True) for k, v in model.state_dict().items())


def test_clipped_share_of_the_activation_quantizer():
    """The paper's per-sample-mean range clips the values of samples wider than the mean one; the
    batch's min/max clips nothing. layer_fidelity reports the share, summarize its size-weighted mean."""
    torch.manual_seed(0)
    x = torch.randn(16, 2, 8, 8) * torch.logspace(-1, 1, 16).view(-1, 1, 1, 1)  # samples of different widths
    y = torch.randint(0, 10, (16,))
    expected = None
    for estimator in ("sample_mean", "batch"):
        conv = q8.QConv2d(2, 10, 8, spec=q8.LayerQuant(act_estimator=estimator))
        model = torch.nn.Sequential(conv, torch.nn.Flatten())
        rows = q8.layer_fidelity(model, x, y)
        (row,) = [r for r in rows if r["kind"] == "activation"]
        if estimator == "batch":
            assert row["clipped"] == 0.0
        else:
            lo, hi = q8.sample_mean_range(x)
            expected = float(((x < lo) | (x > hi)).float().mean())
            assert row["clipped"] == pytest.approx(expected) and expected > 0.05
            assert summarize(rows)["activation"]["clipped"] == pytest.approx(expected)
