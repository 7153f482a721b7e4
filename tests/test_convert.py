"""convert(), QuantConfig and the models: keys, identity when disabled, overrides, any model."""

import dataclasses

import pytest
import torch
import torchvision
from torch import nn

import q8
from q8 import QConv2d, QLinear, QuantConfig, RangeBatchNorm2d
from q8.layers import QBatchNorm2d
from q8.models import build


def test_keys_and_parameter_objects_survive():
    model = build("resnet20", num_classes=10, in_channels=1)
    keys = set(model.state_dict())
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    q8.convert(model, QuantConfig.preset("int8"))
    new_keys = set(model.state_dict())
    assert keys <= new_keys and all(k.endswith("act_range") for k in new_keys - keys)
    for name, p in model.named_parameters():
        assert p is params[name]
    assert isinstance(model.conv1, QConv2d) and isinstance(model.fc, QLinear) and isinstance(model.bn1, RangeBatchNorm2d)
    # the optimizer built before convert still trains the converted model
    before = model.fc.weight.detach().clone()
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.fc.weight)


@pytest.mark.parametrize("name", ["resnet20", "mobilenet"])
def test_disabled_quantization_is_bit_identical(name):
    torch.manual_seed(0)
    make = (lambda: build("resnet20")) if name == "resnet20" else (lambda: torchvision.models.mobilenet_v3_small(num_classes=5))
    ref = make()
    model = make()
    model.load_state_dict(ref.state_dict())
    q8.convert(model, QuantConfig.preset("fp32"))
    assert any(isinstance(m, QConv2d) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)  # the same dropout masks
    out_ref = ref(x)
    torch.manual_seed(1)
    out = model(x)
    assert torch.equal(out_ref, out)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_overrides_keep_first_and_last_layers_float():
    cfg = QuantConfig(overrides={"conv1": "float", "fc": "float", "layer3.*": {"grad_bits": 4}})
    model = q8.convert(build("resnet20"), cfg)
    assert model.conv1.spec.is_float and model.fc.spec.is_float
    assert model.layer1[0].conv1.spec.weight_bits == 8
    assert model.layer3[0].conv1.spec.grad_bits == 4 and model.layer2[0].conv1.spec.grad_bits == 8


def test_module_filter_and_batchnorm_variants():
    model = q8.convert(build("resnet20"), QuantConfig(), module_filter_fn=lambda m, fqn: fqn != "fc")
    assert type(model.fc) is nn.Linear
    model = q8.convert(build("resnet20"), QuantConfig(norm="batch"))
    assert type(model.bn1) is QBatchNorm2d
    model = q8.convert(build("resnet20"), QuantConfig(norm="range", range_bn_chunks=4, range_bn_constant="paper"))
    assert model.bn1.chunks == 4 and model.bn1.constant == "paper"


def test_converts_a_model_it_was_not_written_for():
    model = torchvision.models.mobilenet_v3_small(num_classes=7)  # grouped convs, SE, hardswish
    q8.convert(model, QuantConfig.preset("int8"))
    x = torch.randn(4, 3, 64, 64)
    out = model(x)
    out.logsumexp(1).sum().backward()
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

        def forward(self, x):
            return self.body(x)

    tiny = q8.convert(Tiny(), QuantConfig())
    assert isinstance(tiny.body[0], QConv2d) and isinstance(tiny.body[4], QLinear)
    assert tiny(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_convert_a_bare_layer_and_reject_bad_config():
    assert isinstance(q8.convert(nn.Linear(3, 2), QuantConfig()), QLinear)
    with pytest.raises(TypeError, match="QuantConfig"):
        q8.convert(nn.Linear(3, 2), {"weight_bits": 8})


@pytest.mark.parametrize(
    "field,value",
    [("grad_bits", 40), ("grad_bits", "nine"), ("weight_bits", True), ("act_bits", 0), ("grad_rounding", "up"),
     ("weight_range", "row"), ("act_momentum", 0.0), ("norm", "group"), ("range_bn_chunks", 0),
     ("range_bn_constant", "magic")],
)
def test_bad_config_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**{field: value})


def test_bad_overrides_name_the_pattern():
    with pytest.raises(ValueError, match=r"overrides\['fc'\].*grad_bitz"):
        QuantConfig(overrides={"fc": {"grad_bitz": 8}})
    with pytest.raises(ValueError, match=r"overrides\['fc'\].*grad_bits"):
        QuantConfig(overrides={"fc": {"grad_bits": 99}})


def test_presets():
    p = q8.PRESETS
    assert p["fp32"].is_float
    assert (p["int8"].weight_bits, p["int8"].grad_bits, p["int8"].grad_weight_bits, p["int8"].norm) == (8, 8, 16, "range")
    assert not p["int8_no_bifurcation"].bifurcated and p["int8"].bifurcated
    assert p["int8_fp32_wgrad"].grad_weight_bits is None
    assert QuantConfig.preset("int8", grad_bits=4).grad_bits == 4
    with pytest.raises(ValueError, match="unknown quantization preset"):
        QuantConfig.preset("int4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p["int8"].grad_bits = 4


@pytest.mark.parametrize(
    "name,in_channels,size,params",
    [("resnet20", 1, 28, 272_186), ("resnet56", 3, 32, 855_770), ("resnet18_cifar", 3, 32, 11_173_962),
     ("resnet18", 3, 64, 11_181_642), ("resnet50", 3, 64, 23_528_522)],
)
def test_models(name, in_channels, size, params):
    model = build(name, num_classes=10, in_channels=in_channels)
    assert sum(p.numel() for p in model.parameters()) == params
    q8.convert(model, QuantConfig())
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model"):
        build("vgg16")
