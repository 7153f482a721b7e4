"""convert(), QuantConfig and the models: keys, identity when disabled, overrides, any model."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

import q8
import q8.distributed
from q8 import (QConv1d, QConv2d, QConv3d, QConvTranspose2d, QLinear, QuantConfig, RangeBatchNorm1d, RangeBatchNorm2d,
                RangeBatchNorm3d)
from q8.convert import FLOAT_OF
from q8.layers import QBatchNorm1d, QBatchNorm2d, QBatchNorm3d
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


def signal_net() -> nn.Module:
    """A 1-d convolutional net (audio, sensor signals) with a BatchNorm1d over features, too."""
    return nn.Sequential(nn.Conv1d(2, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 8, 3, stride=2, groups=8),
                         nn.BatchNorm1d(8), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 16),
                         nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def volume_net() -> nn.Module:
    """A 3-d convolutional net (video, medical volumes)."""
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 4, 3, stride=2),
                         nn.BatchNorm3d(4), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3))


def decoder_net() -> nn.Module:
    """Down- and upsampling (segmentation decoders, U-Nets, generators): a transposed convolution."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.parametrize("build_net,shape,quantized", [
    (signal_net, (8, 2, 30), {QConv1d: 2, RangeBatchNorm1d: 3, QLinear: 2}),
    (volume_net, (4, 1, 6, 7, 8), {QConv3d: 2, RangeBatchNorm3d: 2, QLinear: 1}),
    (decoder_net, (4, 1, 10, 10), {QConv2d: 2, QConvTranspose2d: 1, RangeBatchNorm2d: 2}),
])
def test_1d_3d_and_transposed_networks_are_quantized_whole_and_train(build_net, shape, quantized):
    """Conv1d/3d, ConvTranspose and BatchNorm1d/3d have q8 versions: nothing stays float (strict), a
    training step is finite, unconvert gives the torch layers back, and norm="batch" keeps standard BN
    quantized."""
    torch.manual_seed(0)
    model = build_net()
    params = dict(model.named_parameters())
    q8.convert(model, QuantConfig.preset("int8"), strict=True)
    kinds = [type(m) for m in model.modules()]
    assert {k: kinds.count(k) for k in quantized} == quantized and q8.coverage(model).share() == 1
    assert all(p is params[n] for n, p in model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(shape), torch.randint(0, 3, (shape[0],))
    rows = q8.layer_fidelity(model, x, y)  # the diagnostics see every quantized product
    layers = [n for n, m in model.named_modules() if type(m) in quantized and "Norm" not in type(m).__name__]
    assert {r["layer"] for r in rows} == set(layers) and all(math.isfinite(r["cosine"]) for r in rows)
    assert all(r["cosine"] > 0.9 for r in rows if r["kind"] in ("weight", "activation"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, before[n]) for n, p in model.named_parameters())
    model.eval()
    assert torch.isfinite(model(x)).all()
    q8.unconvert(model)
    assert not any(type(m) in FLOAT_OF for m in model.modules())
    standard = q8.convert(build_net(), QuantConfig.preset("int8", norm="batch"))
    range_bn = {k for k in quantized if "Norm" in k.__name__}
    standard_bn = {RangeBatchNorm1d: QBatchNorm1d, RangeBatchNorm2d: QBatchNorm2d, RangeBatchNorm3d: QBatchNorm3d}
    assert {type(m) for m in standard.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)} == {
        standard_bn[k] for k in range_bn}
    synced = q8.distributed.sync_norms(q8.convert(build_net(), QuantConfig.preset("fp32", norm="batch")))
    sync_of = {RangeBatchNorm1d: q8.layers.SyncBatchNorm1d, RangeBatchNorm2d: q8.layers.SyncBatchNorm2d,
               RangeBatchNorm3d: q8.layers.SyncBatchNorm3d}  # the float BN of each rank, synchronized on any device
    assert {type(m) for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)} == {
        sync_of[k] for k in range_bn}
    assert sum(isinstance(m, q8.layers.SyncBatchNormNd) for m in synced.modules()) == sum(quantized[k] for k in range_bn)


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
     ("resnet18", 3, 64, 11_181_642), ("resnet50", 3, 64, 23_528_522), ("mobilenet_v2_cifar", 1, 28, 2_236_106),
     ("shufflenet_v2_cifar", 1, 28, 1_263_422), ("vit_tiny", 1, 28, 5_353_738), ("vit_tiny", 3, 32, 5_362_762),
     ("vit_w64", 1, 28, 139_018), ("row_lstm", 1, 28, 82_186), ("row_lstm", 3, 32, 117_002)],
)
def test_models(name, in_channels, size, params):
    """Each model config (configs/model/<name>.yaml) builds the model for the data's channels and size."""
    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs" / "model" / f"{name}.yaml")
    model = build(cfg.name, num_classes=10, in_channels=in_channels, image_size=size, **cfg.kwargs)
    assert sum(p.numel() for p in model.parameters()) == params
    # every layer with parameters has a q8 version (a ViT's LayerNorms and embeddings stay float)
    q8.convert(model, QuantConfig(), strict=not name.startswith("vit"))
    assert q8.coverage(model).share() > 0.99
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model"):
        build("vgg16")


# ---- convert() never fails silently (coverage, overrides, twice, shared, hooks, parametrizations) ----


class Mixed(nn.Module):
    """Layers q8 quantizes beside layers it has no quantized version of."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.group_norm = nn.GroupNorm(2, 8)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.prelu = nn.PReLU(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv(x).flatten(2)  # [B, 8, HW]
        x = self.group_norm(x).transpose(1, 2)  # [B, HW, 8]
        x = self.norm(x)
        x = self.attn(x, x, x, need_weights=False)[0]
        return self.fc(self.prelu(self.gru(x)[0].mean(1)))


def test_coverage_names_what_stays_float_and_strict_refuses_it(caplog):
    model = Mixed()
    with caplog.at_level("INFO", logger="q8"):
        q8.convert(model, QuantConfig())
    report = q8.coverage(model)
    # MultiheadAttention counts as one layer, its out_proj (whose weight its forward reads) with it
    assert dict(report.quantized) == {"Conv2d": 1, "Linear": 1, "MultiheadAttention": 1, "GroupNorm": 1, "LayerNorm": 1,
                                      "GRU": 1}
    assert dict(report.unsupported) == {"PReLU": 1}
    assert report.params["quantized", "MultiheadAttention"] == sum(p.numel() for p in model.attn.parameters())
    assert report.share() == pytest.approx(1 - 8 / sum(p.numel() for p in model.parameters()))
    line = report.summary()
    assert "6 of 7 layers" in line and "1 PReLU (8 params)" in line
    assert line in caplog.text
    with pytest.raises(ValueError, match="strict.*PReLU"):
        q8.convert(Mixed(), QuantConfig(), strict=True)
    q8.convert(build("resnet20"), QuantConfig(), strict=True)  # nothing left in float: accepted
    fp32 = q8.coverage(q8.convert(build("resnet20"), QuantConfig.preset("fp32")))
    assert fp32.share() == 0 and not fp32.unsupported and fp32.float_by_config["Conv2d"] == 21


class ScaledBlock(nn.Module):
    """A block holding a parameter of its own beside layers q8 quantizes (ConvNeXt's layer scale)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((4,), 1e-2))
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.scale.view(1, -1, 1, 1) * self.fc(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_coverage_counts_quantized_layers_inside_a_block_it_has_no_version_of():
    """The block's own parameter stays float and is named; the convolution and linear inside it
    are quantized and counted so (they were once reported float with their block)."""
    model = q8.convert(nn.Sequential(ScaledBlock(), ScaledBlock()), QuantConfig())
    assert isinstance(model[0].conv, QConv2d) and isinstance(model[0].fc, QLinear)
    report = q8.coverage(model)
    assert dict(report.quantized) == {"Conv2d": 2, "Linear": 2} and dict(report.unsupported) == {"ScaledBlock": 2}
    assert report.params["unsupported", "ScaledBlock"] == 8
    assert report.share() == pytest.approx(1 - 8 / sum(p.numel() for p in model.parameters()))
    shared = ScaledBlock()
    assert q8.coverage(nn.Sequential(shared, shared)).unsupported["ScaledBlock"] == 1  # one module, counted once


class ReadsWeights(nn.Module):
    """A parent that passes its children's weights to F.linear itself (as torchvision's Swin
    attention does with qkv and proj), beside a child it calls."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(6, 6), nn.Linear(6, 6, bias=False)
        self.called = nn.utils.parametrizations.weight_norm(nn.Linear(6, 3, bias=False))
        self.norm = nn.BatchNorm1d(6)

    def forward(self, x):
        x = torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias)
        return self.called(self.norm(torch.nn.functional.linear(x, self.proj.weight)))


def test_coverage_with_an_example_finds_layers_their_parent_bypasses():
    """convert swaps qkv and proj, but forward never calls them: with an example batch coverage
    reports them bypassed (float in effect), by name; the layers forward calls stay quantized, and
    the check changes no buffer, gradient or random stream."""
    model = q8.convert(ReadsWeights(), QuantConfig.preset("int8"))
    x = torch.randn(8, 6)
    assert q8.coverage(model).share() == 1.0  # by structure alone, all of it looks quantized
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    report = q8.coverage(model, x)
    assert dict(report.bypassed) == {"Linear": 2} and report.bypassed_names == ["qkv", "proj"]
    assert dict(report.quantized) == {"Linear": 1, "BatchNorm1d": 1}  # the parametrized one and the norm run
    assert report.share() == pytest.approx(1 - (42 + 36) / sum(p.numel() for p in model.parameters()))
    assert "BYPASSED" in report.summary() and "qkv, proj" in report.summary()
    assert report.as_dict()["bypassed_layers"] == ["qkv", "proj"]
    same = lambda a, b: torch.equal(a.float().nan_to_num(-7.0), b.float().nan_to_num(-7.0))  # NaN: no range yet
    assert all(same(v, buffers[k]) for k, v in model.named_buffers()) and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    for net, batch in ((build("resnet20"), torch.randn(2, 3, 16, 16)),
                       (torchvision.models.mobilenet_v3_small(num_classes=5), torch.randn(2, 3, 32, 32))):
        assert not q8.coverage(q8.convert(net, QuantConfig.preset("int8")), batch).bypassed  # no false alarms
    swin = q8.convert(torchvision.models.swin_t(num_classes=5), QuantConfig.preset("int8"))
    report = q8.coverage(swin, torch.randn(1, 3, 32, 32))
    assert dict(report.bypassed) == {"Linear": 24} and all(n.endswith((".attn.qkv", ".attn.proj"))
                                                           for n in report.bypassed_names)


def test_override_that_matches_nothing_names_the_pattern():
    with pytest.raises(ValueError, match=r"\['layer_4\.\*'\] match no convertible layer"):
        q8.convert(build("resnet20"), QuantConfig(overrides={"layer_4.*": "float", "fc": "float"}))


@pytest.mark.parametrize("first,second", [("fp32", "int8"), ("int8", "fp32"), ("int8", "int8_no_bifurcation")])
def test_converting_twice_gives_the_second_config_only(first, second):
    torch.manual_seed(0)
    twice = q8.convert(q8.convert(build("resnet20"), QuantConfig.preset(first)), QuantConfig.preset(second))
    torch.manual_seed(0)
    once = q8.convert(build("resnet20"), QuantConfig.preset(second))
    assert [type(m) for m in twice.modules()] == [type(m) for m in once.modules()]
    for a, b in zip(twice.modules(), once.modules()):
        assert getattr(a, "spec", None) == getattr(b, "spec", None)
    x = torch.randn(4, 3, 16, 16)
    once.load_state_dict(twice.state_dict())
    twice.eval(), once.eval()
    assert torch.equal(twice(x), once(x))


def test_shared_module_is_converted_once_and_hooks_survive():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    calls = []
    conv.register_forward_hook(lambda m, i, o: calls.append("fwd"))
    conv.register_forward_pre_hook(lambda m, i: calls.append("pre"))
    model = nn.Sequential(conv, nn.ReLU(), conv)  # one module under the names "0" and "2"
    q8.convert(model, QuantConfig())
    assert isinstance(model[0], QConv2d) and model[0] is model[2]
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    assert calls == ["pre", "fwd", "pre", "fwd"]
    with pytest.raises(ValueError, match="shared under two names"):
        q8.convert(nn.Sequential(conv, conv), QuantConfig(overrides={"1": "float"}))


def test_parametrized_weights_are_quantized_after_the_parametrization():
    torch.manual_seed(0)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    lin = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 2))
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), lin)
    params = dict(model.named_parameters())
    q8.convert(model, QuantConfig(), strict=True)
    assert isinstance(model[0], QConv2d) and isinstance(model[3], QLinear)
    assert dict(model.named_parameters()).keys() == params.keys()
    assert model[0].weight.shape == (4, 3, 3, 3)  # computed by the parametrization
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert model[0].parametrizations.weight.original0.grad is not None  # weight_norm's g
    assert torch.isfinite(model[3].parametrizations.weight.original.grad).all()


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated")
def test_old_weight_norm_is_refused_with_the_fix():
    conv = nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="parametrizations.weight_norm"):
        q8.convert(nn.Sequential(conv), QuantConfig())


def test_unbatched_input_and_eval_mode_are_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    q8.convert(model, QuantConfig())
    assert not any(m.training for m in model.modules())
    x = torch.randn(3, 8, 8)
    model.train()
    model(x.unsqueeze(0))  # sets the activation ranges
    model.eval()
    assert torch.equal(model[0](x), model[0](x.unsqueeze(0)).squeeze(0))


def test_a_q8_checkpoint_loads_into_the_float_model():
    torch.manual_seed(0)
    quantized = q8.convert(build("resnet20"), QuantConfig())
    quantized(torch.randn(4, 3, 16, 16))
    state = quantized.state_dict()
    assert {k for k in state if k.endswith("act_range")}  # q8 adds one buffer per quantized layer
    float_model = build("resnet20")
    float_model.load_state_dict(q8.float_state_dict(state))  # strict: every other key matches
    back = q8.unconvert(quantized)
    assert not any(type(m) in FLOAT_OF for m in back.modules())
    assert back.state_dict().keys() == float_model.state_dict().keys()
