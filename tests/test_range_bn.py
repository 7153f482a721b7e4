"""Range BN: the formula per constant, chunks of any shape, running statistics, exact gradients;
the norms without batch statistics (QLayerNorm, QGroupNorm)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import q8
from q8 import LayerQuant, RangeBatchNorm1d, RangeBatchNorm2d, RangeBatchNorm3d
from q8.layers import REFERENCE_FACTOR, QBatchNorm2d, chunk_sizes, expected_range


def reference_range_bn(x, weight, bias, chunks, constant, eps=1e-5, range_of=None):
    """Range BN written independently: per channel, split values with tensor_split, amax/amin.
    range_of: the tensor whose range is measured (default x)."""
    C = x.shape[1]
    v = x.transpose(0, 1).reshape(C, -1)
    r = (x if range_of is None else range_of).transpose(0, 1).reshape(C, -1)
    n = v.shape[1]
    k = max(1, min(chunks, n // 2))
    parts = torch.tensor_split(r, k, dim=1)
    rng = sum(p.amax(1) - p.amin(1) for p in parts) / k
    if constant == "paper":
        divisor = sum(math.sqrt(2 * math.log(p.shape[1])) for p in parts) / k
    elif constant == "reference":
        divisor = sum(math.sqrt(2 * math.log(p.shape[1])) / REFERENCE_FACTOR for p in parts) / k
    else:
        divisor = sum(expected_range(p.shape[1]) for p in parts) / k
    sigma = rng / divisor
    mean = v.mean(1)
    shape = (1, C) + (1,) * (x.dim() - 2)
    y = (x - mean.view(shape)) / torch.sqrt(sigma**2 + eps).view(shape)
    return y * weight.view(shape) + bias.view(shape), mean, sigma**2


def test_expected_range_exact_values():
    # E[range] of 2 and 3 standard normals: 2/sqrt(pi) and 3/sqrt(pi).
    assert expected_range(2) == pytest.approx(2 / math.sqrt(math.pi), rel=1e-6)
    assert expected_range(3) == pytest.approx(3 / math.sqrt(math.pi), rel=1e-6)
    samples = torch.randn(4000, 500, dtype=torch.float64)
    mc = (samples.amax(1) - samples.amin(1)).mean().item()
    assert expected_range(500) == pytest.approx(mc, rel=0.01)
    with pytest.raises(ValueError, match="at least 2"):
        expected_range(1)


@pytest.mark.parametrize("constant", ["paper", "reference", "exact"])
@pytest.mark.parametrize("chunks,shape", [(1, (8, 3, 5, 5)), (16, (8, 3, 5, 5)), (7, (3, 2, 5, 7)), (50, (1, 2, 3, 3))])
def test_matches_hand_written_reference(constant, chunks, shape):
    bn = RangeBatchNorm2d(shape[1], chunks=chunks, constant=constant)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    bn = bn.double()
    y = bn(x)
    ref, mean, var = reference_range_bn(x, bn.weight, bn.bias, chunks, constant)
    assert torch.allclose(y, ref, atol=1e-10)
    assert torch.allclose(bn.running_mean, 0.1 * mean)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * var)


@pytest.mark.parametrize("kind,shape", [(RangeBatchNorm1d, (24, 3)), (RangeBatchNorm1d, (6, 3, 5)),
                                        (RangeBatchNorm3d, (4, 2, 3, 4, 5))])
@pytest.mark.parametrize("chunks", [1, 4, 5])
def test_1d_and_3d_inputs_match_the_reference_and_gradcheck(kind, shape, chunks):
    """Range BN is the same formula over every dim but the channel's: (N, C) and (N, C, L) for
    BatchNorm1d, (N, C, D, H, W) for BatchNorm3d (chunks of whole samples, and of any size)."""
    bn = kind(shape[1], chunks=chunks).double()
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    y = bn(x)
    ref, mean, var = reference_range_bn(x, bn.weight, bn.bias, chunks, "exact")
    assert torch.allclose(y, ref, atol=1e-10)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * var)
    g = torch.randn_like(y)
    assert torch.allclose(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], atol=1e-9)
    assert torch.autograd.gradcheck(
        lambda x, w, b: q8.layers.RangeBNFunction.apply(x, w, b, None, None, 0.0, bn.eps, chunks, "exact", None, None, None),
        (x.detach().requires_grad_(), bn.weight, bn.bias))
    with pytest.raises(ValueError, match="expected 2D or 3D input|expected 5D input"):
        bn(torch.randn(2, shape[1], 2, 2, dtype=torch.float64))  # a 4-d input is BatchNorm2d's


def test_output_std_per_constant_on_gaussian_input():
    # One channel's range fluctuates by about 5%, so the claim is about the mean over channels.
    x = torch.randn(64, 64, 16, 16) * 2.5 + 3
    std = {c: RangeBatchNorm2d(64, constant=c)(x).std((0, 2, 3)).mean() for c in ("paper", "reference", "exact")}
    assert abs(std["exact"] - 1) < 0.02  # exact: BN's scale by construction
    assert 0.5 < std["paper"] < 0.67  # METHOD.md: about 0.55-0.67
    assert 0.95 < std["reference"] < 1.1


def test_chunks_with_remainders():
    assert chunk_sizes(37, 16) == (16, 2, 5)  # 5 chunks of 3, 11 of 2
    assert chunk_sizes(5, 16) == (2, 2, 1)  # never a chunk of fewer than 2 values
    bn = RangeBatchNorm2d(3, chunks=16)
    y = bn(torch.randn(1, 3, 37, 1))  # B*H*W = 37, not divisible by 16
    assert torch.isfinite(y).all()


def test_single_value_per_channel_is_an_error():
    with pytest.raises(ValueError, match="at least 2 values"):
        RangeBatchNorm2d(3)(torch.randn(1, 3, 1, 1))


def test_eval_uses_running_statistics():
    bn = RangeBatchNorm2d(3)
    for _ in range(3):
        bn(torch.randn(16, 3, 4, 4) * 2 + 1)
    bn.eval()
    x = torch.randn(5, 3, 4, 4)
    ref = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert torch.equal(bn(x), ref)
    assert bn.num_batches_tracked.item() == 3


def test_momentum_none_is_a_cumulative_average():
    bn = RangeBatchNorm2d(2, momentum=None)
    xs = [torch.randn(8, 2, 3, 3) + i for i in range(3)]
    for x in xs:
        bn(x)
    assert torch.allclose(bn.running_mean, torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0), atol=1e-6)


@pytest.mark.parametrize("chunks", [1, 3])
def test_gradcheck(chunks):
    bn = RangeBatchNorm2d(2, chunks=chunks).double()
    nn.init.normal_(bn.weight)
    x = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    w = bn.weight
    assert torch.autograd.gradcheck(
        lambda x, w, b: q8.layers.RangeBNFunction.apply(x, w, b, None, None, 0.0, bn.eps, chunks, "exact", None, None, None),
        (x, w, bn.bias),
    )


@pytest.mark.parametrize("chunks", [1, 2])
def test_gradient_with_ties_goes_to_one_extreme(chunks):
    """Many equal values at the max and min (integer-valued input): the range's gradient goes to
    one of them (the first, as torch.max(dim) picks it), a subgradient of max; its sum over the
    tied elements, and the gradient everywhere else, equal autograd through amax / amin."""
    x = torch.randint(0, 4, (4, 2, 3, 3)).double().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    bn = RangeBatchNorm2d(2, chunks=chunks).double()
    g = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    bn(x).backward(g)
    ref, _, _ = reference_range_bn(x2, bn.weight, bn.bias, chunks, "exact")
    ref.backward(g)
    v = x.detach()
    if chunks == 1:
        tied = (v == v.amax((0, 2, 3), keepdim=True)) | (v == v.amin((0, 2, 3), keepdim=True))
        assert torch.allclose(x.grad[~tied], x2.grad[~tied], atol=1e-10)
        for c in range(2):
            for ext in (v[:, c].max(), v[:, c].min()):
                at = v[:, c] == ext
                assert torch.allclose(x.grad[:, c][at].sum(), x2.grad[:, c][at].sum(), atol=1e-10)
    assert torch.allclose(x.grad.sum((0, 2, 3)), x2.grad.sum((0, 2, 3)), atol=1e-10)


def test_channels_last_input_gives_the_same_result():
    bn = RangeBatchNorm2d(3, spec=LayerQuant(act_bits=8, grad_bits=None)).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    g = torch.randn_like(x)
    out = []
    for layout in (torch.contiguous_format, torch.channels_last):
        xx = x.clone(memory_format=layout).requires_grad_()
        y = bn(xx)
        y.backward(g)
        out.append((y.detach(), xx.grad))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-12) and torch.allclose(out[0][1], out[1][1], atol=1e-12)


@pytest.mark.parametrize("chunks", [1, 3])
def test_quantized_input_and_output_gradient(chunks):
    """The input is quantized (8 bits over the per-sample-mean range) and then normalized;
    the range statistic is measured before the quantizer (METHOD.md section 3). Gradients:
    straight-through for the quantizer, exact for mean and range, 8-bit output gradient."""
    spec = LayerQuant(act_bits=8, grad_bits=8)
    bn = RangeBatchNorm2d(3, spec=spec, chunks=chunks).double()
    nn.init.normal_(bn.weight)
    x = (torch.randn(8, 3, 4, 4, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.3]).view(1, 3, 1, 1)).requires_grad_()
    y = bn(x)
    lo, hi = q8.sample_mean_range(x)
    x2 = x.detach().clone().requires_grad_()
    xq = x2 + (q8.quantize(x2.detach(), 8, lo=lo, hi=hi) - x2).detach()  # straight-through
    assert (xq.detach() != x2.detach()).any()
    ref, _, _ = reference_range_bn(xq, bn.weight, bn.bias, chunks, "exact", range_of=x2)
    assert torch.allclose(y, ref, atol=1e-10)
    g = torch.randn_like(y)
    torch.manual_seed(5)
    y.backward(g)
    torch.manual_seed(5)
    ref.backward(q8.quantize(g, 8, rounding="stochastic"))
    assert torch.allclose(x.grad, x2.grad, atol=1e-10)


@pytest.mark.parametrize("chunks", [1, 16])
def test_exact_constant_gives_unit_std_at_the_int8_preset(chunks):
    """At 8 bits the per-sample-mean activation range clips the tails of wide channels; a range
    measured on the clipped values would shrink sigma (std up to 1.6 on the wide channels).
    Measured before the clip, the exact constant keeps BN's scale."""
    torch.manual_seed(0)
    scales = torch.cat([torch.ones(60), torch.tensor([0.2, 4.0, 8.0, 10.0])])
    x = torch.randn(32, 64, 16, 16) * scales.view(1, -1, 1, 1) + 0.5
    bn = q8.convert(nn.Sequential(nn.BatchNorm2d(64)), q8.QuantConfig.preset("int8", range_bn_chunks=chunks))[0]
    assert isinstance(bn, RangeBatchNorm2d) and bn.spec.act_bits == 8
    std = bn(x).detach().std((0, 2, 3))
    assert abs(std.mean() - 1) < 0.05
    assert (std[-4:] - 1).abs().max() < 0.1, std[-4:]  # the unequal channels too


def test_state_dict_matches_batchnorm_and_float_checkpoints_load():
    bn = nn.BatchNorm2d(4)
    rbn = RangeBatchNorm2d(4)
    assert set(rbn.state_dict()) == set(bn.state_dict()) | {"act_range"}
    rbn.load_state_dict(bn.state_dict())


def test_quantized_standard_bn():
    spec = LayerQuant(act_bits=8, grad_bits=8)
    qbn = QBatchNorm2d(3, spec=spec)
    x = torch.randn(8, 3, 4, 4)
    lo, hi = q8.sample_mean_range(x)
    ref = nn.BatchNorm2d(3)(q8.quantize(x, 8, lo=lo, hi=hi))
    assert torch.allclose(qbn(x), ref, atol=1e-6)


SAMPLE_NORMS = [
    (lambda: nn.LayerNorm(6), q8.QLayerNorm, (5, 4, 6), lambda x, m: F.layer_norm(x, (6,), m.weight, m.bias)),
    (lambda: nn.LayerNorm((3, 4), bias=False), q8.QLayerNorm, (5, 3, 4), lambda x, m: F.layer_norm(x, (3, 4), m.weight)),
    (lambda: nn.GroupNorm(2, 6), q8.QGroupNorm, (5, 6, 3, 3), lambda x, m: F.group_norm(x, 2, m.weight, m.bias)),
    (lambda: nn.GroupNorm(3, 6, affine=False), q8.QGroupNorm, (5, 6, 7), lambda x, m: F.group_norm(x, 3)),
]


@pytest.mark.parametrize("make,kind,shape,formula", SAMPLE_NORMS)
def test_layer_and_group_norm_quantize_input_and_output_gradient(make, kind, shape, formula):
    """forward = the norm of the 8-bit input (per-sample-mean range); the input and parameter
    gradients = autograd of that norm applied to the 8-bit stochastic copy of the output gradient
    (same draw); the float spec is torch's layer itself."""
    torch.manual_seed(0)
    float_norm = make()
    for p in float_norm.parameters():
        nn.init.normal_(p)
    norm = kind.from_float(float_norm, LayerQuant())
    x = torch.randn(shape, requires_grad=True) * torch.linspace(0.5, 3, shape[0]).view(-1, *[1] * (len(shape) - 1))
    x = x.detach().requires_grad_()
    y = norm(x)
    lo, hi = q8.sample_mean_range(x)
    xq = q8.quantize(x.detach(), 8, lo=lo, hi=hi).requires_grad_()
    ref = formula(xq, norm)
    assert torch.allclose(y, ref, atol=1e-6) and not torch.allclose(y, formula(x, norm), atol=1e-3)
    g = torch.randn_like(y)
    torch.manual_seed(5)
    y.backward(g)
    torch.manual_seed(5)
    gq = q8.quantize_gradient(g, 8)
    assert not torch.equal(gq, g)
    params = list(norm.parameters())
    expected = torch.autograd.grad(ref, [xq] + params, gq)
    assert torch.allclose(x.grad, expected[0], atol=1e-5)
    for p, e in zip(params, expected[1:]):
        assert torch.allclose(p.grad, e, atol=1e-5)
    plain = kind.from_float(make(), q8.layers.FLOAT_SPEC)
    assert torch.equal(plain(x), type(float_norm).forward(plain, x))


def test_layer_and_group_norm_convert_and_convert_back():
    """int8 swaps LayerNorm and GroupNorm (Range BN or not: they have no batch statistics), fp32
    keeps torch's layers; names are unchanged, each adds act_range; unconvert gives torch's back."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(2, 6), nn.Flatten(2), nn.LayerNorm(4))
    names = set(model.state_dict())
    for preset in ("int8", "int8_batch_range"):
        q8.convert(model, q8.QuantConfig.preset(preset))
        assert type(model[1]) is q8.QGroupNorm and type(model[3]) is q8.QLayerNorm
        assert set(model.state_dict()) == names | {"0.act_range", "1.act_range", "3.act_range"}
    assert q8.coverage(model).share() == 1.0
    q8.convert(model, q8.QuantConfig.preset("fp32"))
    assert type(model[1]) is nn.GroupNorm and type(model[3]) is nn.LayerNorm
    assert dict(q8.coverage(model).float_by_config) == {"Conv2d": 1, "GroupNorm": 1, "LayerNorm": 1}
    q8.convert(model, q8.QuantConfig.preset("int8"))
    q8.unconvert(model)
    assert type(model[1]) is nn.GroupNorm and type(model[3]) is nn.LayerNorm and set(model.state_dict()) == names


@pytest.mark.parametrize("shape", [(8, 3, 5, 5), (16, 2, 3, 3)])
def test_chunks_of_whole_samples_match_the_general_split(shape):
    """A batch divisible by the chunk count takes the fast path (chunks from per-sample extremes);
    it must equal the general channels-first split, values and gradients."""
    x = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    bn = RangeBatchNorm2d(shape[1], chunks=4).double()
    nn.init.normal_(bn.weight)
    fast = x.clone().requires_grad_()
    y = bn(fast)
    y.backward(g)
    ref_x = x.clone().requires_grad_()
    ref, _, _ = reference_range_bn(ref_x, bn.weight, bn.bias, 4, "exact")
    ref.backward(g)
    assert torch.allclose(y, ref, atol=1e-10) and torch.allclose(fast.grad, ref_x.grad, atol=1e-10)
    general = q8.layers._Extrema(x, 4, None, None)
    sliced = q8.layers._Extrema(torch.cat([x, x[:1]]), 4, None, None)  # N + 1: not divisible, general path
    assert general.chunks == 4 and sliced.chunks == 4
