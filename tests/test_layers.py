"""QConv1d/2d/3d, QConvTranspose1d/2d/3d, QLinear: forward once, gradients bifurcation by hand, SQNR floors, stored codes."""

import importlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import q8
import q8.models
from q8 import LayerQuant, QConv1d, QConv2d, QConv3d, QConvTranspose1d, QConvTranspose2d, QConvTranspose3d, QLinear
from q8.quantize import channel_sample_mean_range, fake_quantize, quantize_tensor

PAPER = LayerQuant()  # 8-bit W/A/G, 16-bit weight-gradient copy


def bifurcated_copies(g, spec, seed):
    """The two gradient copies: one U[0, 1) draw u; the 16-bit copy dithers with frac(256 u)."""
    torch.manual_seed(seed)
    u = torch.rand(g.shape)
    lo, hi = g.min(), g.max()
    g8 = fake_quantize(g, spec.grad_bits, lo, hi, "stochastic", noise=u)
    g16 = fake_quantize(g, spec.grad_weight_bits, lo, hi, "stochastic", noise=(u * 256).frac())
    return g8, g16


def hand_conv_backward(conv, x, g, spec, seed):
    """The paper's backward written out with the public quantizer and F ops."""
    lo, hi = q8.sample_mean_range(x)
    xq = q8.quantize(x.detach(), spec.act_bits, lo=lo, hi=hi)
    wq = q8.quantize(conv.weight.detach(), spec.weight_bits)
    g8, g16 = bifurcated_copies(g, spec, seed)
    out = F.conv2d(xq, wq, conv.bias, conv.stride, conv.padding)
    gx = F.conv_transpose2d(g8, wq, stride=conv.stride, padding=conv.padding,
                            output_padding=[x.shape[-1] - ((g.shape[-1] - 1) * conv.stride[0] - 2 * conv.padding[0] + 3)] * 2)
    gw = torch.nn.grad.conv2d_weight(xq, conv.weight.shape, g16, conv.stride, conv.padding)
    return out, gx, gw, g16.sum((0, 2, 3))


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_forward_and_gradients_match_the_formulas(stride):
    conv = QConv2d(3, 5, 3, stride=stride, padding=1, spec=PAPER)
    x = torch.randn(4, 3, 9, 9, requires_grad=True)
    out = conv(x)
    g = torch.randn_like(out)
    torch.manual_seed(7)
    out.backward(g)
    ref_out, gx, gw, gb = hand_conv_backward(conv, x, g, PAPER, seed=7)
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert torch.allclose(x.grad, gx, atol=1e-5)
    assert torch.allclose(conv.weight.grad, gw, atol=1e-4)
    assert torch.allclose(conv.bias.grad, gb, atol=1e-4)


def check_against_autograd(conv, x, float_op):
    """Assert a PAPER-spec layer's output and gradients equal autograd of float_op(xq, wq, b) on the
    quantized input and weight: the input gradient from the 8-bit copy of g, weight and bias
    gradients from the 16-bit copy. Returns the layer's output."""
    out = conv(x)
    g = torch.randn_like(out)
    torch.manual_seed(7)
    out.backward(g)
    lo, hi = q8.sample_mean_range(x)
    xq = q8.quantize(x.detach(), 8, lo=lo, hi=hi).requires_grad_()
    wq = q8.quantize(conv.weight.detach(), 8).requires_grad_()
    b = conv.bias.detach().clone().requires_grad_()
    g8, g16 = bifurcated_copies(g, PAPER, seed=7)
    ref = float_op(xq, wq, b)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(x.grad, torch.autograd.grad(ref, xq, g8, retain_graph=True)[0], atol=1e-5)
    gw, gb = torch.autograd.grad(ref, (wq, b), g16)
    assert torch.allclose(conv.weight.grad, gw, atol=1e-4) and torch.allclose(conv.bias.grad, gb, atol=1e-4)
    return out


@pytest.mark.parametrize("kind,spatial", [(QConv1d, (11,)), (QConv3d, (5, 6, 7))])
def test_conv1d_and_conv3d_match_the_formulas_on_batched_and_unbatched_input(kind, spatial):
    """The bifurcated product of any spatial rank: forward on the 8-bit input and weight, the input
    gradient from the 8-bit copy of g, weight and bias gradients from the 16-bit copy (autograd of
    the float convolution applied to the quantized tensors)."""
    conv = kind(3, 5, 3, stride=2, padding=1, spec=PAPER)
    x = torch.randn((4, 3) + spatial, requires_grad=True)
    op = getattr(F, f"conv{len(spatial)}d")
    out = check_against_autograd(conv, x, lambda xq, wq, b: op(xq, wq, b, stride=2, padding=1))
    assert conv(x[0].detach()).shape == out.shape[1:]  # unbatched (C, ...), as torch's layer takes it
    float_conv = getattr(nn, f"Conv{len(spatial)}d")(3, 4, 3, padding=1, padding_mode="reflect")
    only_grads = kind.from_float(float_conv, LayerQuant(None, None, 16, 16))
    assert torch.allclose(only_grads(x), float_conv(x), atol=1e-6)


@pytest.mark.parametrize("kind,spatial", [(QConvTranspose1d, (9,)), (QConvTranspose2d, (5, 6)), (QConvTranspose3d, (3, 4, 5))])
def test_transposed_convolutions_match_the_formulas(kind, spatial):
    """A transposed convolution (strided, grouped, output_padding) is the same bifurcated product:
    forward on the 8-bit input and weight, the input gradient from the 8-bit copy of g, weight and
    bias gradients from the 16-bit copy; output_size and unbatched input work as in torch."""
    conv = kind(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, spec=PAPER)
    x = torch.randn((3, 4) + spatial, requires_grad=True)
    op = getattr(F, f"conv_transpose{len(spatial)}d")
    out = check_against_autograd(conv, x, lambda xq, wq, b: op(xq, wq, b, stride=2, padding=1, output_padding=1, groups=2))
    assert out.shape == (3, 6) + tuple(2 * n for n in spatial)
    smaller = [2 * n - 1 for n in spatial]  # output_size picks the output padding, as in torch
    assert conv(x, output_size=smaller).shape[2:] == tuple(smaller)
    assert conv(x[0].detach()).shape == out.shape[1:]
    torch_conv = getattr(nn, f"ConvTranspose{len(spatial)}d")(4, 6, 3, stride=2, padding=1, groups=2)
    as_float = kind.from_float(torch_conv, LayerQuant(None, None, None, None))
    assert torch.equal(as_float(x, output_size=smaller), torch_conv(x, output_size=smaller))  # exactly torch's


def test_transposed_convolution_weight_ranges_are_per_output_channel():
    """Its weight is [in, out / groups, ...]: weight_range="channel" gives each output channel (of
    each group) its own range, not each input channel."""
    conv = QConvTranspose2d(4, 6, 3, groups=2, spec=LayerQuant(weight_range="channel"))
    with torch.no_grad():
        conv.weight.mul_(torch.logspace(-2, 2, 3).view(1, 3, 1, 1))  # output channel j of each group: its scale
    probe = conv.probe = {}
    conv(torch.randn(2, 4, 5, 5))
    w, wq = probe["weight"]
    for group in range(2):
        for j in range(3):
            rows = slice(2 * group, 2 * group + 2)  # the group's input channels
            assert torch.equal(wq[rows, j], q8.quantize(w[rows, j], 8))  # one range per output channel
    assert q8.sqnr_db(w[:, 0], wq[:, 0]) > 40  # the narrowest channel keeps its precision


def test_linear_gradients_match_matmul_and_accept_leading_dims():
    lin = QLinear(6, 4, spec=PAPER)
    x = torch.randn(2, 5, 6, requires_grad=True)
    out = lin(x)
    g = torch.randn_like(out)
    torch.manual_seed(3)
    out.backward(g)
    lo, hi = q8.sample_mean_range(x)
    xq = q8.quantize(x.detach(), 8, lo=lo, hi=hi)
    wq = q8.quantize(lin.weight.detach(), 8)
    g8, g16 = bifurcated_copies(g, PAPER, seed=3)
    assert torch.allclose(out, xq @ wq.t() + lin.bias, atol=1e-5)
    assert torch.allclose(x.grad, g8 @ wq, atol=1e-5)
    assert torch.allclose(lin.weight.grad, g16.reshape(-1, 4).t() @ xq.reshape(-1, 6), atol=1e-4)
    assert torch.allclose(lin.bias.grad, g16.reshape(-1, 4).sum(0), atol=1e-5)


def test_weight_gradient_precision_follows_grad_weight_bits():
    """16-bit copy: weight gradient near float; 8-bit copy (no bifurcation): much noisier;
    None: exactly the float product with the unquantized gradient."""
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(16, 8, 12, 12)
    g = torch.randn(16, 16, 12, 12)
    ref = torch.nn.grad.conv2d_weight(x, conv.weight.shape, g, padding=1)
    sq = {}
    for gw_bits in (16, 8, None):
        spec = LayerQuant(weight_bits=None, act_bits=None, grad_bits=8, grad_weight_bits=gw_bits)
        q = QConv2d.from_float(conv, spec)
        conv.weight.grad = None
        q(x).backward(g)
        sq[gw_bits] = q8.sqnr_db(ref, conv.weight.grad)
    assert sq[16] > 75 and sq[8] < 45 and sq[None] > 120


def test_shared_draw_keeps_both_copies_unbiased():
    g = torch.linspace(-1, 1, 41, dtype=torch.float64).expand(4000, -1).contiguous()
    g_in, g_w = q8.layers.gradient_copies(g, PAPER, True, True)
    for copy, bits in ((g_in, 8), (g_w, 16)):
        step = 2 / (2**bits - 1)
        assert ((copy - g).abs() < step).all()
        assert (copy.mean(0) - g[0]).abs().max() < 4 * (step / 2) / 4000**0.5
    assert not torch.equal(g_w, g)  # the 16-bit copy is really rounded stochastically


def test_no_bifurcation_shares_one_gradient_copy():
    spec = LayerQuant(weight_bits=None, act_bits=None, grad_bits=4, grad_weight_bits=4)
    lin = QLinear(5, 3, bias=False, spec=spec)
    x = torch.randn(7, 5, requires_grad=True)
    out = lin(x)
    g = torch.randn_like(out)
    torch.manual_seed(11)
    out.backward(g)
    torch.manual_seed(11)
    g4 = q8.quantize(g, 4, rounding="stochastic")  # the one and only draw
    assert torch.allclose(x.grad, g4 @ lin.weight.detach(), atol=1e-6)
    assert torch.allclose(lin.weight.grad, g4.t() @ x.detach(), atol=1e-6)


def count_ops(fn, name):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == name)


def test_forward_convolution_runs_once_per_call():
    conv = QConv2d(4, 4, 3, padding=1, spec=PAPER)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    assert count_ops(lambda: conv(x).sum().backward(), "aten::convolution") == 1
    assert count_ops(lambda: conv(x).sum().backward(), "aten::convolution_backward") == 2  # two copies of g


def test_sqnr_against_float_layer():
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(32, 16, 16, 16, requires_grad=True)
    out = conv(x)
    g = torch.randn_like(out)
    out.backward(g)
    ref_out, ref_gw, ref_gx = out.detach(), conv.weight.grad.clone(), x.grad.clone()
    figures = {}
    for bits in (8, 16):
        spec = LayerQuant(weight_bits=bits, act_bits=bits, grad_bits=bits, grad_weight_bits=16)
        q = QConv2d.from_float(conv, spec)
        conv.weight.grad = x.grad = None
        o = q(x)
        o.backward(g)
        figures[bits] = (q8.sqnr_db(ref_out, o), q8.sqnr_db(ref_gw, conv.weight.grad), q8.sqnr_db(ref_gx, x.grad))
    # 8 bits: about 40 dB. 16 bits: the per-sample-mean activation range clips the extremes,
    # which caps forward SQNR near 46 dB; the input gradient is then at 16-bit precision.
    assert figures[8][0] > 36 and figures[8][1] > 36 and figures[8][2] > 33
    assert figures[16][0] > 43 and figures[16][1] > 43 and figures[16][2] > 80
    print("SQNR dB (out, grad_w, grad_x):", figures)


def test_running_activation_range_and_eval():
    conv = QConv2d(2, 3, 1, spec=PAPER)
    x1, x2 = torch.randn(4, 2, 5, 5), torch.randn(4, 2, 5, 5) * 3
    conv(x1)
    r1 = torch.stack(q8.sample_mean_range(x1))
    assert torch.allclose(conv.act_range, r1)  # first batch initializes
    conv(x2)
    r2 = torch.stack(q8.sample_mean_range(x2))
    assert torch.allclose(conv.act_range, 0.9 * r1 + 0.1 * r2)  # PyTorch's momentum convention
    conv.eval()
    x3 = torch.randn(4, 2, 5, 5)
    xq = q8.quantize(x3, 8, lo=conv.act_range[0], hi=conv.act_range[1])
    assert torch.allclose(conv(x3), F.conv2d(xq, q8.quantize(conv.weight, 8), conv.bias), atol=1e-6)


def test_float_spec_is_bit_identical_to_nn_conv():
    conv = nn.Conv2d(3, 4, 3)
    q = QConv2d.from_float(nn.Conv2d(3, 4, 3), LayerQuant(None, None, None, None))
    q.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 7, 7)
    assert torch.equal(q(x), conv(x))


@pytest.mark.parametrize("padding,mode", [("same", "zeros"), (1, "reflect"), (2, "circular")])
def test_padding_modes(padding, mode):
    conv = nn.Conv2d(3, 4, 3, padding=padding, padding_mode=mode)
    q = QConv2d.from_float(conv, LayerQuant(None, None, 16, 16))  # only gradients quantized
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = q(x)
    assert torch.allclose(y, conv(x), atol=1e-6)
    y.sum().backward()
    x2 = x.detach().requires_grad_()
    conv(x2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-3)


def test_per_channel_weight_range():
    conv = QConv2d(3, 4, 3, spec=LayerQuant(weight_range="channel"))
    conv.weight.data[0] *= 100  # one wide channel would crush the others at tensor range
    probe = conv.probe = {}
    conv(torch.randn(2, 3, 5, 5))
    w, wq = probe["weight"]
    lo, hi = q8.channel_range(w)
    assert torch.equal(wq, q8.quantize(w, 8, lo=lo, hi=hi))
    assert q8.sqnr_db(w[1], wq[1]) > 40


def test_zero_weights_and_bias_give_finite_gradients():
    conv = QConv2d(2, 2, 3, padding=1, spec=PAPER)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    conv(x).sum().backward()
    for t in (x.grad, conv.weight.grad, conv.bias.grad):
        assert torch.isfinite(t).all()
    # an all-zero gradient too
    conv.zero_grad()
    (conv(x) * 0).sum().backward()
    assert torch.isfinite(conv.weight.grad).all() and torch.equal(conv.weight.grad, torch.zeros_like(conv.weight))


def test_saved_input_is_stored_as_8_bit_codes():
    conv = QConv2d(8, 8, 3, padding=1, spec=PAPER)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        conv(x)
    big = [t for t in saved if t.numel() == x.numel()]
    assert [t.dtype for t in big] == [torch.uint8]


def test_float_checkpoint_loads_into_quantized_layer():
    conv = nn.Conv2d(2, 3, 3)
    q = QConv2d(2, 3, 3, spec=PAPER)
    q.load_state_dict(conv.state_dict())  # strict: act_range may be missing
    assert torch.equal(q.weight, conv.weight) and torch.isnan(q.act_range).all()


@pytest.mark.parametrize("inplace", [False, True])
def test_qrelu_has_relus_gradients_and_saves_a_bool_mask(inplace):
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    g = torch.randn(4, 3, 5, 5)
    y = q8.layers.QReLU(inplace)(x * 1.0)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_()
    F.relu(x2).backward(g)
    assert torch.equal(y, F.relu(x.detach())) and torch.equal(x.grad, x2.grad)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q8.layers.QReLU(inplace)(x * 1.0)
    assert [t.dtype for t in saved if t.shape == x.shape] == [torch.bool]


def test_float32_layer_gradients_are_unbiased_and_the_copies_nearly_independent():
    """On the real float32 path: each gradient copy is unbiased, through the layer's own
    products too, and the two copies' rounding errors are nearly uncorrelated although they
    share one draw. Bound: given frac(256 u), u still takes 256 evenly spaced values, so the
    8-bit copy's rounding probability moves by at most 1/256: |corr| <= about 2 / 256."""
    torch.manual_seed(0)
    spec = LayerQuant(weight_bits=None, act_bits=None)  # only the gradients are quantized
    g = torch.randn(64, 48)
    g[0, 0] = 8.0  # a heavy tail sets a wide range: most values sit between few grid points
    draws = 1500
    e8, e16 = torch.empty(draws, g.numel()), torch.empty(draws, g.numel())
    for i in range(draws):
        g_in, g_w = q8.layers.gradient_copies(g, spec, True, True)
        e8[i], e16[i] = (g_in - g).flatten(), (g_w - g).flatten()
    step8, step16 = (g.max() - g.min()) / 255, (g.max() - g.min()) / 65535
    assert (e8.mean(0).abs() < 4 * (step8 / 2) / draws**0.5 + 1e-6).all()
    assert (e16.mean(0).abs() < 4 * (step16 / 2) / draws**0.5 + 1e-7).all()
    a, b = e8.flatten(), e16.flatten()
    corr = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))
    print(f"\ncorrelation of the 8-bit and 16-bit copies' errors: {corr:.4f}")
    assert abs(corr) < 2 / 256
    # through the layer: E[weight gradient] = g^T x with the 16-bit copy, E[input gradient] = g W with the 8-bit one
    lin = QLinear(32, 48, bias=False, spec=spec)
    x = torch.randn(64, 32, requires_grad=True)
    gw_sum, gx_sum = torch.zeros_like(lin.weight), torch.zeros_like(x)
    n = 300
    for _ in range(n):
        lin.weight.grad = x.grad = None
        lin(x).backward(g)
        gw_sum += lin.weight.grad
        gx_sum += x.grad
    exact_w, exact_x = g.t() @ x.detach(), g @ lin.weight.detach()
    assert (gw_sum / n - exact_w).abs().max() < 4 * (step16 / 2) * 64**0.5 / n**0.5 * x.abs().max()
    assert (gx_sum / n - exact_x).abs().max() < 4 * (step8 / 2) * 48**0.5 / n**0.5 * lin.weight.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_and_backward(dtype):
    """Under autocast the products run in the autocast dtype, as in the float model; quantization
    stays in float32, every gradient comes back in its own tensor's dtype, and each layer's
    output and gradients follow the float32 ones."""
    torch.manual_seed(0)
    layers = {
        "conv": (QConv2d(8, 16, 3, padding=1, spec=PAPER), (8, 8, 12, 12)),
        "linear": (QLinear(24, 16, spec=PAPER), (32, 24)),
        "range_bn": (q8.RangeBatchNorm2d(8, chunks=4, spec=LayerQuant(act_bits=8, grad_bits=8)), (8, 8, 6, 6)),
    }
    for name, (layer, shape) in layers.items():
        x = torch.randn(shape) * 2 + 0.5
        res = []
        for enabled in (False, True):
            xx = x.clone().requires_grad_()
            layer.zero_grad()
            q8.seed_rounding(0)
            with torch.autocast("cpu", dtype=dtype, enabled=enabled):
                out = layer(xx if name != "range_bn" else xx.to(dtype) if enabled else xx)
            if enabled and name != "range_bn":
                assert out.dtype == dtype
            out.backward(torch.ones_like(out) + torch.linspace(0, 1, out.numel()).view(out.shape).to(out.dtype))
            res.append([out.float(), xx.grad] + [p.grad for p in layer.parameters()])
        q8.seed_rounding(None)
        for (a, b), what in zip(zip(*res), ["output", "input grad", "weight grad", "bias grad"]):
            assert b.dtype == torch.float32 and torch.isfinite(b).all(), (name, what)
            assert q8.cosine(a, b) > 0.99, (name, what, q8.cosine(a, b))
    model = q8.convert(q8.models.build("resnet20", in_channels=1, width=4), q8.QuantConfig.preset("int8"))
    with torch.autocast("cpu", dtype=dtype):
        loss = F.cross_entropy(model(torch.randn(8, 1, 16, 16)).float(), torch.randint(0, 10, (8,)))
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_per_channel_activation_ranges_where_channels_stay_apart():
    """act_range="channel": a depthwise convolution (and a norm) quantizes each input channel over
    its own sample-mean range; a convolution that sums over channels keeps the tensor range."""
    torch.manual_seed(0)
    spec = LayerQuant(weight_bits=None, grad_bits=None, grad_weight_bits=None, act_range="channel")
    scales = torch.tensor([0.01, 1.0, 50.0]).view(1, 3, 1, 1)
    x = torch.randn(6, 3, 8, 8) * scales
    dw = QConv2d(3, 3, 3, padding=1, groups=3, bias=False, spec=spec)
    full = QConv2d(3, 4, 3, padding=1, bias=False, spec=spec)
    assert dw.range_channels() == 3 and full.range_channels() == 0 and dw.act_range.shape == (2, 3)
    lo, hi = channel_sample_mean_range(x)
    xq = q8.quantize(x, 8, lo=lo.view(1, 3, 1, 1), hi=hi.view(1, 3, 1, 1))
    assert torch.allclose(dw(x), F.conv2d(xq, dw.weight, padding=1, groups=3), atol=1e-6)
    tensor_xq = q8.quantize(x, 8, lo=q8.sample_mean_range(x)[0], hi=q8.sample_mean_range(x)[1])
    small = (slice(None), 0)
    # the narrow channel keeps its shape (about 2^8 levels) instead of collapsing onto one or two
    assert xq[small].unique().numel() > 100 and tensor_xq[small].unique().numel() <= 2
    assert torch.allclose(full(x), F.conv2d(tensor_xq, full.weight, padding=1), atol=1e-4)
    assert torch.allclose(dw.act_range, torch.stack([lo, hi]))  # the running range, per channel
    dw.eval()
    assert torch.allclose(dw(x), F.conv2d(xq, dw.weight, padding=1, groups=3), atol=1e-6)
    model = q8.convert(q8.models.build("mobilenet_v2_cifar", num_classes=10, in_channels=1, width_mult=0.5),
                       q8.QuantConfig.preset("int8", act_range="channel"))
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    assert model.features[1].conv[0][0].range_channels() == 16 and model.features[1].conv[1].range_channels() == 0
    state = model.state_dict()
    again = q8.convert(q8.models.build("mobilenet_v2_cifar", num_classes=10, in_channels=1, width_mult=0.5),
                       q8.QuantConfig.preset("int8", act_range="channel"))
    again.load_state_dict(state)


@pytest.mark.parametrize("grad_range,dim", [("sample", 0), ("channel", 1)])
def test_gradient_range_per_sample_or_channel_keeps_small_slices(grad_range, dim):
    """One range per slice of dim: each slice's error stays below its own step and is unbiased, so a
    slice 1000x smaller than the widest keeps its direction, where one range for the tensor
    (the paper's) rounds it to a coarse grid."""
    torch.manual_seed(0)
    g = torch.randn(6, 5, 4, 4, dtype=torch.float64)
    g.select(dim, 0).mul_(1000)
    draws = 2000
    spec = LayerQuant(grad_bits=6, grad_weight_bits=12, grad_range=grad_range)
    mean_in = torch.zeros_like(g)
    for _ in range(draws):
        g_in, g_w = q8.layers.gradient_copies(g, spec, True, True)
        for copy, bits in ((g_in, 6), (g_w, 12)):
            lo, hi = q8.channel_range(g, dim)
            assert ((copy - g).abs() <= (hi - lo) / (2**bits - 1) * (1 + 1e-9)).all()
        mean_in += g_in / draws
    small = g.select(dim, 1)
    assert F.cosine_similarity(g_in.select(dim, 1).flatten(), small.flatten(), dim=0) > 0.95
    step = (small.max() - small.min()) / 63
    assert (mean_in.select(dim, 1) - small).abs().max() < 4 * (step / 2) / draws**0.5
    paper, _ = q8.layers.gradient_copies(g, LayerQuant(grad_bits=6, grad_weight_bits=12), True, True)
    assert F.cosine_similarity(paper.select(dim, 1).flatten(), small.flatten(), dim=0) < 0.5


def test_sample_rotation_is_orthogonal_and_spreads_a_spike():
    """SampleRotation is a signed Hadamard matrix over blocks of each sample (the largest power of two
    dividing its size, at most HADAMARD_BLOCK): undone it gives x back, it keeps every sample's norm,
    and a lone spike becomes +-1/sqrt(block) over its block."""
    torch.manual_seed(0)
    for shape, block in (((4, 3, 5, 4), 4), ((3, 256), 64), ((5, 7), 1), ((2, 16, 28, 28), 64), ((6,), 1)):
        x = torch.randn(shape, dtype=torch.float64)
        r = q8.SampleRotation(x)
        assert r.block == block
        y = r.apply(x)
        assert torch.allclose(r.undo(y, x.dtype), x, atol=1e-12)
        assert torch.allclose(y.reshape(shape[0], -1).norm(dim=1), x.reshape(shape[0], -1).norm(dim=1))
        spike = torch.zeros(shape, dtype=torch.float64)
        spike.view(shape[0], -1)[:, 0] = 1
        rows = r.apply(spike).reshape(shape[0], -1)
        assert torch.allclose(rows[:, :block].abs(), torch.full((shape[0], block), block ** -0.5, dtype=torch.float64))
        assert (rows[:, block:] == 0).all()
    half = torch.randn(4, 64, dtype=torch.bfloat16)
    r = q8.SampleRotation(half)
    assert r.apply(half).dtype == torch.float32 and r.undo(r.apply(half), half.dtype).dtype == torch.bfloat16


def test_hadamard_gradient_range_is_unbiased_and_shrinks_heavy_tails():
    """grad_range="hadamard": each copy is R^T Q(R g) with R a fresh SampleRotation and Q one range per
    sample: unbiased, its error per sample at most sqrt(size) steps of that sample's rotated range
    (R keeps norms), and on a heavy-tailed gradient (a spike A per sample among Gaussian values: its
    rotated range is about 2A/8, not A) far smaller than one range per sample of g itself."""
    torch.manual_seed(0)
    g = torch.randn(8, 4, 8, 8, dtype=torch.float64)
    rows = g.view(8, -1)
    for i in range(8):
        rows[i, torch.randint(256, ())] = 100.0 * (i + 1)
    spec = LayerQuant(grad_bits=4, grad_weight_bits=12, grad_range="hadamard")
    draws, mean, err_hadamard = 2000, torch.zeros_like(g), 0.0
    for _ in range(draws):
        q8.seed_rounding(None)
        copies = q8.layers.GradientCopies(g, spec)
        g_in, g_w = copies.input(), copies.weight()
        step = (copies.hi - copies.lo).view(8) / 15
        assert ((g_in - g).view(8, -1).norm(dim=1) <= step * 256 ** 0.5 * (1 + 1e-9)).all()
        assert (g_w - g).abs().max() < (g_in - g).abs().max()  # the 12-bit copy is finer
        mean += g_in / draws
        err_hadamard += ((g_in - g) ** 2).mean() / draws
    assert (mean - g).abs().max() < 4 * (step.max() * 256 ** 0.5 / 2) / draws ** 0.5
    per_sample = LayerQuant(grad_bits=4, grad_weight_bits=12, grad_range="sample")
    err_sample = sum(((q8.layers.gradient_copies(g, per_sample)[0] - g) ** 2).mean() for _ in range(200)) / 200
    assert err_hadamard < err_sample / 4, (err_hadamard, err_sample)


def test_hadamard_gradient_range_reaches_every_quantized_gradient(monkeypatch):
    """The layers whose output gradient is quantized by a hook or inside their Function (Range BN,
    standard BN at 8 bit) use the rotated estimator too: they rotate, and over draws their input
    gradient averages to the one of an unquantized output gradient; one draw is not it."""
    rotations, module = [], importlib.import_module("q8.quantize")  # q8.quantize is also the function

    class Counted(module.SampleRotation):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            rotations.append(self)

    monkeypatch.setattr(module, "SampleRotation", Counted)
    torch.manual_seed(0)
    x, g = torch.randn(16, 4, 4, 4, dtype=torch.float64), torch.randn(16, 4, 4, 4, dtype=torch.float64)
    for make in (q8.RangeBatchNorm2d, q8.QBatchNorm2d):
        grads = {}
        for bits in (None, 4):
            norm = make(4, spec=LayerQuant(act_bits=None, grad_bits=bits, grad_range="hadamard")).double()
            draws = [torch.autograd.grad(norm(x.requires_grad_()), x, g)[0] for _ in range(1 if bits is None else 400)]
            grads[bits] = (draws[0], sum(draws) / len(draws))
        reference, scale = grads[None][0], grads[None][0].abs().max()
        assert (grads[4][0] - reference).abs().max() > 0.05 * scale  # one 4-bit draw
        assert (grads[4][1] - reference).abs().max() < 0.02 * scale, make.__name__  # their mean
        assert len(rotations) == 400, make.__name__  # one rotation per quantized backward
        rotations.clear()
    for empty in (torch.empty(0, 3, 2, 2), torch.empty(4, 0)):  # nothing to rotate, no range to take
        for grad_range in ("sample", "channel", "hadamard"):
            spec = LayerQuant(grad_range=grad_range)
            assert all(c.shape == empty.shape for c in q8.layers.gradient_copies(empty, spec))
            assert q8.quantize_gradient(empty, 8, "stochastic", grad_range).shape == empty.shape
    with pytest.raises(ValueError, match="grad_range"):
        q8.quantize_grad(torch.ones(2, requires_grad=True), 8, grad_range="rotated")


def test_layers_back_propagate_on_the_per_sample_grid():
    """QLinear's input gradient is g_in W with g_in on each sample's own 2-bit grid; a 1-d gradient
    (no sample dimension) falls back to the tensor's range."""
    spec = LayerQuant(weight_bits=None, act_bits=None, grad_bits=2, grad_weight_bits=None, grad_range="sample")
    lin = QLinear(5, 3, bias=False, spec=spec)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    lin.double()
    g = torch.randn(7, 3, dtype=torch.float64) * torch.logspace(-3, 3, 7, dtype=torch.float64)[:, None]
    lin(x).backward(g)
    g_in = torch.linalg.lstsq(lin.weight.detach().t(), x.grad.t()).solution.t()  # x.grad = g_in W
    lo, hi = q8.channel_range(g, 0)
    codes = (g_in - lo) / ((hi - lo) / 3)
    assert torch.allclose(codes, codes.round(), atol=1e-6) and (codes.round() >= 0).all() and (codes.round() <= 3).all()
    assert torch.equal(lin.weight.grad, g.t() @ x.detach())  # float weight-gradient copy
    v = torch.linspace(-1, 1, 9)
    assert torch.equal(quantize_tensor(v, 2, "nearest", 0), quantize_tensor(v, 2, "nearest"))


def test_unknown_gradient_range_names_the_field():
    with pytest.raises(ValueError, match="grad_range"):
        LayerQuant(grad_range="row")


@pytest.mark.parametrize("make", [lambda spec: QConv2d(3, 4, 3, padding=1, spec=spec),
                                  lambda spec: q8.RangeBatchNorm2d(3, spec=spec),
                                  lambda spec: QConv2d(3, 3, 3, padding=1, groups=3, spec=spec)])
def test_batch_activation_estimator_takes_min_and_max_without_clipping(make):
    """act_estimator="batch": the batch's own min and max (per channel where act_range="channel"),
    so an outlier sample is kept; the paper's per-sample mean clips it."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    x[3, 1, 2, 2] = 40.0
    x[5, 0, 1, 1] = -25.0
    for act_range in ("tensor", "channel"):
        layer = make(LayerQuant(act_estimator="batch", act_range=act_range))
        layer(x)
        lo, hi = layer.act_range
        if layer.range_channels():
            assert torch.equal(lo, x.amin((0, 2, 3))) and torch.equal(hi, x.amax((0, 2, 3)))
        else:
            assert (float(lo), float(hi)) == (-25.0, 40.0)
        paper = make(LayerQuant(act_range=act_range))
        paper(x)
        assert paper.act_range[1].max() < 40.0 / 4 and paper.act_range[0].min() > -25.0 / 4


def test_unknown_activation_estimator_names_the_field():
    with pytest.raises(ValueError, match="act_estimator"):
        LayerQuant(act_estimator="percentile")


@pytest.mark.parametrize("spec", [LayerQuant(None, None, None, None), LayerQuant(None, None, 16, 16), PAPER],
                         ids=["float", "gradients_only", "paper"])
@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(2, 8), (1, 5, 5, 2)),  # F.linear of a >2-D input with bias returns a view of its 2-D product
    (nn.Linear(3, 4, bias=False), (2, 3, 5, 3)),
    (nn.Conv2d(3, 4, 3), (3, 8, 8)),  # unbatched: torch adds and removes the batch dimension as views
    (nn.Conv1d(3, 4, 3), (3, 10)),
], ids=["linear_4d", "linear_4d_no_bias", "conv2d_unbatched", "conv1d_unbatched"])
def test_an_inplace_op_may_follow_a_layer_of_any_input_shape(layer, shape, spec):
    """A layer's output is its own tensor, never a view made inside the autograd Function: autograd
    refuses in-place ops on such a view (a ReLU(inplace=True) after the layer, as in Swin V2's
    position-bias MLP). Nothing rounded, the layer and the ReLU match torch's."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    q = {nn.Linear: QLinear, nn.Conv2d: QConv2d, nn.Conv1d: QConv1d}[type(layer)].from_float(layer, spec)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    y = F.relu(q(xs[0]), inplace=True)
    y_float = nn.ReLU(inplace=True)(layer(xs[1]))
    y.backward(torch.ones_like(y))
    y_float.backward(torch.ones_like(y_float))
    if spec.act_bits is None:
        torch.testing.assert_close(y, y_float)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-3, atol=1e-3)  # 16-bit gradient
    else:
        assert q8.cosine(y, y_float) > 0.99 and torch.isfinite(xs[0].grad).all()


def test_a_product_a_backend_returns_as_a_view_is_copied():
    """The guard for any Ops (an integer backend's too): a view it returns becomes the layer's own tensor."""
    class ViewOps(q8.layers.LinearOps):
        @staticmethod
        def forward(x, w, b):
            return F.linear(x, w, b).unsqueeze(0).squeeze(0)

    layer = nn.Linear(3, 4)
    x = torch.randn(5, 3, requires_grad=True)
    for spec in (LayerQuant(None, None, 16, 16), PAPER):
        lo, hi = torch.tensor(-3.0), torch.tensor(3.0)
        y = q8.layers.BifurcatedProduct.apply(x, layer.weight, layer.bias, ViewOps, spec, lo, hi, None)
        assert not y._is_view()
        F.relu(y, inplace=True).sum().backward()
