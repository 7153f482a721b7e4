"""The fused (compiled) kernels against the op-by-op path: round to nearest bit-identical;
stochastic rounding unbiased, with the eager path's error variance, reproducible from its seed."""

import math

import pytest
import torch
import torch.nn.functional as F

import q8
import q8.models
from q8 import LayerQuant, kernels
from q8.layers import GradientCopies, gradient_copies
from q8.quantize import fake_quantize, quantize_tensor, quantize_with_codes, sample_mean_range


@pytest.fixture
def backend():
    """Run a function under both backends: backend(name) switches."""
    yield kernels.set_backend
    kernels.set_backend("eager")


SHAPES = [(7, 5, 3, 9), (33, 17), (1, 3, 1, 1), (64,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_to_nearest_is_bit_identical(backend, dtype):
    torch.manual_seed(0)
    xs = [(torch.randn(shape) * 3 + 0.5).to(dtype) for shape in SHAPES]
    out = {}
    for name in ("eager", "compiled"):
        backend(name)
        got = []
        for x in xs:
            lo, hi = sample_mean_range(x) if x.dim() > 1 else (x.min(), x.max())
            values, codes = quantize_with_codes(x, 8, lo, hi)
            got += [lo, hi, values, codes.codes, codes.scale, codes.dequantize(), quantize_tensor(x, 8, "nearest"),
                    fake_quantize(x, 4, -1.0, 2.0), quantize_tensor(x, 16, "nearest")]
        out[name] = got
    for a, b in zip(out["eager"], out["compiled"]):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_stochastic_rounding_is_unbiased_with_the_eager_variance(backend):
    x = torch.linspace(-1, 1, 101).expand(4000, -1).contiguous()
    err = {}
    for name in ("eager", "compiled"):
        backend(name)
        torch.manual_seed(0)
        err[name] = fake_quantize(x, 8, -1.0, 1.0, "stochastic") - x
    step = 2 / 255
    assert (err["compiled"].abs() < step).all()
    assert err["compiled"].mean(0).abs().max() < 4 * (step / 2) / math.sqrt(4000)
    # the rounding error's variance is p (1 - p) step^2 per value, whatever the stream
    ve, vc = err["eager"].var(0), err["compiled"].var(0)
    assert torch.allclose(vc, ve, rtol=0.12, atol=1e-8)


def test_one_seed_one_result_and_independent_calls(backend):
    backend("compiled")
    g = torch.randn(300, 40)
    q8.seed_rounding(3, 0, 5)
    a = quantize_tensor(g, 4, "stochastic")
    b = quantize_tensor(g, 4, "stochastic")  # the next call: new dither
    q8.seed_rounding(3, 0, 5)
    assert torch.equal(a, quantize_tensor(g, 4, "stochastic"))
    q8.seed_rounding(3, 1, 5)  # another rank
    c = quantize_tensor(g, 4, "stochastic")
    q8.seed_rounding(None)
    ea, eb, ec = (t - g for t in (a, b, c))
    for other in (eb, ec):
        assert abs(torch.corrcoef(torch.stack([ea.flatten(), other.flatten()]))[0, 1]) < 0.05


@pytest.mark.parametrize("grad_range", ["tensor", "sample", "channel", "hadamard"])
def test_fused_gradient_copies_are_unbiased_and_nearly_independent(backend, grad_range):
    """Both fused copies stay within one step of their own range's grid (the tensor's, each
    sample's or each channel's), are unbiased, and their errors are nearly uncorrelated. Rotated
    (hadamard), each sample's error is bounded in norm: the rotation is orthogonal, and a rotated
    value is at most the sample's norm, so the rotated range at most twice it."""
    backend("compiled")
    torch.manual_seed(0)
    g = torch.randn(64, 48) * torch.logspace(-2, 1, 64).view(-1, 1)  # samples of very different scale
    g[0, 0] = 8.0
    draws = 1500
    e8, e16 = torch.empty(draws, g.numel()), torch.empty(draws, g.numel())
    spec = LayerQuant(grad_range=grad_range)
    assert GradientCopies(g, spec).fused
    for i in range(draws):
        # one at a time, or both from one read of g (what a layer whose gradient fits one slice does)
        g_in, g_w = GradientCopies(g, spec).both() if i % 2 else gradient_copies(g, spec, True, True)
        e8[i], e16[i] = (g_in - g).flatten(), (g_w - g).flatten()
    if grad_range == "hadamard":
        rows = g.norm(dim=1) * 2 * g.shape[1] ** 0.5 * 1.0001  # per sample: sqrt(M) steps of 2 |g_row| / levels
        for e, levels in ((e8, 255), (e16, 65535)):
            assert (e.view(draws, *g.shape).norm(dim=2) <= rows / levels + 1e-6).all()
            assert (e.mean(0).abs() <= 5 * e.std(0) / draws**0.5 + 1e-7).all()  # unbiased
        a, b = e8.flatten(), e16.flatten()
        assert abs(float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))) < 2 / 256
        return
    lo, hi = {"tensor": (g.min(), g.max()), "sample": (g.amin(1, keepdim=True), g.amax(1, keepdim=True)),
              "channel": (g.amin(0, keepdim=True), g.amax(0, keepdim=True))}[grad_range]
    step8, step16 = ((hi - lo) / 255).expand_as(g).flatten(), ((hi - lo) / 65535).expand_as(g).flatten()
    ulp = 2 * float(g.abs().max()) * 2.0**-23  # float32 resolution at g's largest value
    assert (e8.abs() < step8 + ulp).all() and (e16.abs() < step16 + ulp).all()
    assert (e8.mean(0).abs() < 4 * (step8 / 2) / draws**0.5 + 1e-6).all()
    assert (e16.mean(0).abs() < 4 * (step16 / 2) / draws**0.5 + 1e-7).all()
    a, b = e8.flatten(), e16.flatten()
    assert abs(float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))) < 2 / 256


def test_training_with_fused_kernels_follows_the_eager_path(backend):
    """Same model, data and seed: eval outputs (round to nearest) equal; a few SGD steps give
    the same loss curve up to stochastic rounding noise."""
    x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
    losses, evals = {}, {}
    for name in ("eager", "compiled"):
        backend(name)
        torch.manual_seed(0)
        model = q8.convert(q8.models.build("resnet20", in_channels=1, width=4), q8.QuantConfig.preset("int8"))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        q8.seed_rounding(0)
        losses[name] = []
        for _ in range(6):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
        model.eval()
        with torch.no_grad():
            evals[name] = model(x)
        if name == "eager":
            state = model.state_dict()
        else:
            model.load_state_dict(state)
            with torch.no_grad():
                assert torch.equal(model(x), eager_model_eval)
        eager_model_eval = evals["eager"]
    q8.seed_rounding(None)
    assert losses["compiled"][-1] < losses["compiled"][0]
    assert all(abs(a - b) < 0.05 * a for a, b in zip(losses["eager"], losses["compiled"])), losses
    assert kernels.compile_seconds() >= 0


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(backend, monkeypatch, caplog):
    backend("compiled")
    kernels._state["compiled"].clear()

    def broken(fn, **kw):
        def call(*a):
            raise RuntimeError("compiler exploded\nsecond line")
        return call

    monkeypatch.setattr(kernels.torch, "compile", broken)
    x = torch.randn(10, 3)
    with caplog.at_level("WARNING", logger="q8"):
        q = quantize_tensor(x, 8, "nearest")
    kernels._state["compiled"].clear()
    assert kernels.backend() == "eager" and "compiling the quantization kernels failed" in caplog.text
    assert torch.equal(q, quantize_tensor(x, 8, "nearest"))


@pytest.mark.parametrize("chunks,shape", [(1, (8, 6, 5, 7)), (4, (8, 6, 5, 7)), (4, (16, 6))])
def test_fused_range_bn_backward_equals_the_op_by_op_one(backend, monkeypatch, chunks, shape):
    """Same rounding stream, same quantized gradient: the two fused passes (no full-size temporary)
    give the op-by-op backward's input, scale and shift gradients up to summation order."""
    backend("compiled")
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(6) if len(shape) == 4 else torch.nn.BatchNorm1d(6)
    bn = q8.convert(torch.nn.Sequential(norm), q8.QuantConfig.preset("int8", range_bn_chunks=chunks))[0]
    x = (torch.randn(shape) * torch.linspace(0.2, 5, 6).view((1, -1) + (1,) * (len(shape) - 2))).requires_grad_()
    g = torch.randn(shape)
    grads = {}
    for fused in (True, False):
        monkeypatch.setattr(q8.layers, "_fused_range_bn_backward", lambda ctx, g, on=fused: on and ctx.has_codes)
        q8.seed_rounding(5, 0, 0)
        bn.zero_grad()
        x.grad = None
        bn(x).backward(g)
        grads[fused] = (x.grad.clone(), bn.weight.grad.clone(), bn.bias.grad.clone())
    q8.seed_rounding(None)
    for a, b in zip(grads[True], grads[False]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
    assert not torch.equal(grads[True][0], torch.zeros_like(x))


@pytest.mark.parametrize("name", ["eager", "compiled"])
@pytest.mark.parametrize("spec", [LayerQuant(), LayerQuant(grad_weight_bits=8), LayerQuant(grad_range="sample"),
                                  LayerQuant(grad_range="hadamard"), LayerQuant(grad_weight_bits=None)])
def test_backward_over_slices_of_the_batch_equals_the_whole(backend, monkeypatch, name, spec):
    """Output, input, weight and bias gradients of a conv and a linear layer computed over slices of
    the batch (the streamed forward and backward of a large input) equal the all-at-once ones: the
    same ranges, the same dither per element (hashed by index, or one eager draw), sums in another order."""
    backend(name)
    torch.manual_seed(0)
    conv = q8.QConv2d(3, 5, 3, padding=1, stride=2, spec=spec)
    lin = q8.QLinear(7, 4, spec=spec)
    cases = [(conv, torch.randn(11, 3, 9, 9)), (lin, torch.randn(11, 6, 7))]
    for layer, x in cases:
        grads = {}
        for limit in (1 << 30, 60):  # 60 elements: slices of 1 sample (conv) or 2 samples (linear)
            monkeypatch.setattr(q8.layers, "BACKWARD_SLICE_ELEMENTS", limit)
            xi = x.clone().requires_grad_()
            layer.zero_grad()
            q8.seed_rounding(1, 0, 0)
            out = layer(xi)
            out.backward(torch.linspace(-2, 3, out.numel()).view(out.shape) ** 3)
            grads[limit] = (out.detach(), xi.grad, layer.weight.grad.clone(), layer.bias.grad.clone())
        assert len(q8.layers.row_slices(11, x.numel())) > 1
        for a, b in zip(grads[1 << 30], grads[60]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-4), (type(layer).__name__, (a - b).abs().max())
    q8.seed_rounding(None)


def test_one_compiled_kernel_serves_inputs_of_every_rank(backend):
    """Linear, convolution, attention and recurrent layers feed the kernels inputs of ranks 1 to 5
    (and dimensions of size 1); past dynamo's recompile limit (8) each new one would run op by op.
    A per-tensor range sees a 1-D input, a per-sample one (N, M), a per-channel one (N, C, L):
    one specialization each, and the results are those of the eager path."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    shapes = [(64,), (9, 7), (2, 9, 7), (3, 1, 5, 5), (2, 3, 4, 5, 6), (1, 1, 8), (5, 1)]
    xs = [torch.randn(shape) * 2 for shape in shapes]
    backend("compiled")
    kernels._state["compiled"].clear()
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    compiled = {}
    for x in xs:
        compiled[x.shape] = (fake_quantize(x, 8, -1.5, 2.0), quantize_tensor(x, 8, "nearest", 0),
                             quantize_with_codes(x, 8, *sample_mean_range(x) if x.dim() > 1 else (x.min(), x.max())))
    graphs = counters["stats"]["unique_graphs"] - before
    # nearest: 1-D (a scalar range), (N, M) with a range per row, and (N,) with one per row of one
    # element ((5, 1)); own range: 1-D; with codes: 1-D. Each rank a graph of its own made 16.
    assert graphs <= 5, graphs
    backend("eager")
    for x in xs:
        nearest, per_row, (values, codes) = compiled[x.shape]
        assert torch.equal(nearest, fake_quantize(x, 8, -1.5, 2.0))
        assert torch.equal(per_row, quantize_tensor(x, 8, "nearest", 0))
        lo, hi = sample_mean_range(x) if x.dim() > 1 else (x.min(), x.max())
        eager_values, eager_codes = quantize_with_codes(x, 8, lo, hi)
        assert torch.equal(values, eager_values) and torch.equal(codes.codes, eager_codes.codes)
        assert codes.scale.shape == eager_codes.scale.shape and torch.equal(codes.dequantize(), eager_codes.dequantize())
