"""torch.compile over a converted model: one graph (no breaks) on every family, the same eval
output as eager, and training that follows the eager loss curve."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import q8
import q8.models
from q8 import kernels


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    kernels.set_backend("eager")


# One of each block kind, few of them: dynamo's tracing time grows with the layer count, and a graph
# break depends on the kind of layer, not on how many there are. Under tracing both kernel backends
# run the same code (kernels.fused() is true while compiling), so one backend suffices.
SMALL_FAMILIES = {
    "resnet": lambda: q8.models.CifarResNet(8, in_channels=1, width=4),  # stem, blocks, projection shortcuts
    # stem; inverted residuals without expansion, with expansion (both stride 2) and with a residual add
    "mobilenet_v2": lambda: q8.models.build("mobilenet_v2_cifar", in_channels=1, width_mult=0.25,
                                            inverted_residual_setting=[[1, 16, 1, 2], [6, 24, 2, 2]]),
    # a stride-2 block (both branches) and a stride-1 block (channel split, shuffle) in the first stage
    "shufflenet_v2": lambda: torchvision.models.ShuffleNetV2([2, 1, 1], [8, 16, 32, 64, 128], num_classes=10),
}


@pytest.mark.parametrize("family", sorted(SMALL_FAMILIES))
def test_a_converted_model_compiles_to_one_graph(family):
    """Quantizers, both gradient copies (their seeds drawn by an op of q8's own), Range BN and its
    constant, and the ReLU mask all trace: forward and backward, no graph break."""
    kernels.set_backend("compiled")
    model = q8.convert(SMALL_FAMILIES[family](), q8.QuantConfig.preset("int8"))
    channels = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    explanation = torch._dynamo.explain(model)(torch.randn(4, channels, 16, 16))
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_training_follows_eager():
    """Same weights, data and rounding seeds: eval outputs equal; a few SGD steps give the same
    loss curve up to 8-bit rounding (a one-ulp change in a range moves values across grid points)."""
    kernels.set_backend("compiled")
    torch.manual_seed(0)
    # one of each quantized layer (stride 1 and 2 convolutions, Range BN, ReLU, linear): inductor's
    # compile time grows with the graph, and the arithmetic under test is per layer
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    eager = q8.convert(net, q8.QuantConfig.preset("int8"))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    losses = {}
    for key, model, call in (("eager", eager, eager), ("compiled", compiled_model, compiled)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses[key] = []
        for step in range(5):
            q8.seed_rounding(0, 0, step)
            loss = F.cross_entropy(call(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[key].append(loss.item())
    q8.seed_rounding(None)
    assert losses["compiled"][-1] < losses["compiled"][0]
    assert all(abs(a - b) < 0.05 * a for a, b in zip(losses["eager"], losses["compiled"])), losses
    compiled_model.load_state_dict(eager.state_dict())
    eager.eval(), compiled_model.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
