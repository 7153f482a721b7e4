"""torch.compile over a converted model: one graph (no breaks) on every family, the same eval
output as eager, and training that follows the eager loss curve."""

import copy

import pytest
import torch
import torch.nn.functional as F

import q8
import q8.models
from q8 import kernels


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    kernels.set_backend("eager")


@pytest.mark.parametrize("backend,name,kwargs", [("compiled", "resnet20", {"width": 4}), ("eager", "resnet20", {"width": 4}),
                                                 ("compiled", "mobilenet_v2_cifar", {"width_mult": 0.25}),
                                                 ("compiled", "shufflenet_v2_cifar", {"width": 0.5})])
def test_a_converted_model_compiles_to_one_graph(backend, name, kwargs):
    """Quantizers, both gradient copies (their seeds drawn by an op of q8's own), Range BN and its
    constant, and the ReLU mask all trace: forward and backward, no graph break."""
    kernels.set_backend(backend)
    model = q8.convert(q8.models.build(name, in_channels=1, **kwargs), q8.QuantConfig.preset("int8"))
    explanation = torch._dynamo.explain(model)(torch.randn(4, 1, 16, 16))
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_training_follows_eager():
    """Same weights, data and rounding seeds: eval outputs equal; a few SGD steps give the same
    loss curve up to 8-bit rounding (a one-ulp change in a range moves values across grid points)."""
    kernels.set_backend("compiled")
    torch.manual_seed(0)
    eager = q8.convert(q8.models.build("resnet20", in_channels=1, width=4), q8.QuantConfig.preset("int8"))
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
