"""convert(model, config): swap the layers of any float model for their quantized versions, and
say what was quantized (coverage)."""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.utils import parametrize

from .config import QuantConfig
from .diagnostics import uncalled_layers
from .layers import (ActivationRange, QBatchNorm1d, QBatchNorm2d, QBatchNorm3d, QConv1d, QConv2d, QConv3d,
                     QConvTranspose1d, QConvTranspose2d, QConvTranspose3d, QGroupNorm, QLayerNorm, QLinear,
                     QMultiheadAttention, QReLU, RangeBatchNorm1d, RangeBatchNorm2d, RangeBatchNorm3d, SyncBatchNorm1d,
                     SyncBatchNorm2d, SyncBatchNorm3d, adopt)
from .recurrent import QGRU, QLSTM, QRNN, float_kwargs

ModuleFilter = Callable[[nn.Module, str], bool]
log = logging.getLogger("q8")

# torch layer -> its quantized version(s)
CONVS = {nn.Conv1d: QConv1d, nn.Conv2d: QConv2d, nn.Conv3d: QConv3d, nn.ConvTranspose1d: QConvTranspose1d,
         nn.ConvTranspose2d: QConvTranspose2d, nn.ConvTranspose3d: QConvTranspose3d}
NORMS = {nn.BatchNorm1d: (RangeBatchNorm1d, QBatchNorm1d, SyncBatchNorm1d),
         nn.BatchNorm2d: (RangeBatchNorm2d, QBatchNorm2d, SyncBatchNorm2d),
         nn.BatchNorm3d: (RangeBatchNorm3d, QBatchNorm3d, SyncBatchNorm3d)}  # (Range BN, quantized BN, synchronized BN)
# norms without batch statistics: quantized input and output gradient, whatever config.norm says
SAMPLE_NORMS = {nn.LayerNorm: QLayerNorm, nn.GroupNorm: QGroupNorm}
RECURRENT = {nn.RNN: QRNN, nn.LSTM: QLSTM, nn.GRU: QGRU}
# q8 layer -> the float layer it stands for (unconvert, and re-converting a converted model)
FLOAT_OF = {QLinear: nn.Linear, QReLU: nn.ReLU, QMultiheadAttention: nn.MultiheadAttention,
            **{q: kind for kind, q in {**CONVS, **SAMPLE_NORMS, **RECURRENT}.items()},
            **{q: kind for kind, pair in NORMS.items() for q in pair}}
SUPPORTED = (nn.Linear, nn.ReLU, nn.MultiheadAttention, *CONVS, *NORMS, *SAMPLE_NORMS, *RECURRENT)
# layers whose forward reads their children's weights directly (attention's out_proj): converted,
# counted and unconverted whole, with their children
WHOLE = (nn.MultiheadAttention,)


# torch's fused float inference paths (evaluation under no_grad) that read their children's
# weights directly, each with the attribute that turns it off: a quantized child would be skipped
FUSED_INFERENCE = {nn.TransformerEncoderLayer: ("activation_relu_or_gelu", 0),
                   nn.TransformerEncoder: ("use_nested_tensor", False)}


def _fused_inference(model: nn.Module) -> None:
    """Turn torch's fused inference paths off in modules holding a quantized layer, and back on
    (as they were) in modules that no longer hold one."""
    for module in model.modules():
        for kind, (attr, off) in FUSED_INFERENCE.items():
            if not isinstance(module, kind) or not hasattr(module, attr):
                continue
            quantized = any(isinstance(m, ActivationRange) and not m.spec.is_float for m in module.modules())
            if quantized and "_q8_fused" not in vars(module):
                module._q8_fused = getattr(module, attr)
                setattr(module, attr, off)
            elif not quantized and "_q8_fused" in vars(module):
                setattr(module, attr, vars(module).pop("_q8_fused"))


def _base_type(module: nn.Module) -> type:
    """The plain layer type of a module: a q8 layer's float type, a parametrized module's own
    class (torch.nn.utils.parametrize makes a subclass per module), else its type."""
    kind = type(module)
    if parametrize.is_parametrized(module):
        kind = kind.__bases__[0]
    return FLOAT_OF.get(kind, kind)


def _check_hook_weight_norm(module: nn.Module, name: str) -> None:
    from torch.nn.utils.weight_norm import WeightNorm

    if any(isinstance(h, WeightNorm) for h in module._forward_pre_hooks.values()):
        raise ValueError(
            f"{name or 'the model'} uses the old torch.nn.utils.weight_norm, whose hook rebuilds the weight outside the "
            "layer; use torch.nn.utils.parametrizations.weight_norm (which q8 quantizes after the parametrization)"
        )


def _new_layer(module: nn.Module, kind: type, spec, config: QuantConfig) -> nn.Module:
    """The quantized layer of `kind` for `module` (a float layer or a q8 layer), or None to keep it."""
    if kind is nn.ReLU:  # same gradients, a 1-byte mask saved instead of a float output
        return None if config.is_float else adopt(QReLU(module.inplace), module)
    if kind in CONVS:
        return CONVS[kind].from_float(module, spec)
    if kind is nn.Linear:
        return QLinear.from_float(module, spec)
    if kind is nn.MultiheadAttention:
        return QMultiheadAttention.from_float(module, spec)
    if kind in RECURRENT:
        return RECURRENT[kind].from_float(module, spec)
    if kind in SAMPLE_NORMS:
        quantized = spec.act_bits is not None or spec.grad_bits is not None
        return SAMPLE_NORMS[kind].from_float(module, spec) if quantized else _plain(module, kind)
    range_bn, standard_bn, _ = NORMS[kind]
    if config.norm == "range":
        return range_bn.from_float(module, spec, chunks=config.range_bn_chunks, constant=config.range_bn_constant)
    if spec.act_bits is not None or spec.grad_bits is not None:
        return standard_bn.from_float(module, spec)
    return _plain(module, kind)


def _plain(module: nn.Module, kind: type) -> nn.Module:
    """A float layer of `kind` holding the module's Parameters and buffers (module itself if it is one)."""
    if type(module) is kind:
        return module
    if kind is nn.ReLU:
        return adopt(nn.ReLU(module.inplace), module)
    if kind in CONVS:
        extra = dict(output_padding=module.output_padding) if module.transposed else {}
        new = kind(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                   padding=module.padding, dilation=module.dilation, groups=module.groups, bias=module.bias is not None,
                   padding_mode=module.padding_mode, device="meta", **extra)
    elif kind is nn.Linear:
        new = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
    elif kind is nn.MultiheadAttention:
        new = adopt(nn.MultiheadAttention(module.embed_dim, module.num_heads, module.dropout,
                                          module.in_proj_bias is not None, module.bias_k is not None,
                                          module.add_zero_attn, module.kdim, module.vdim, module.batch_first,
                                          device="meta"), module)
        out = module.out_proj
        new.out_proj = adopt(NonDynamicallyQuantizableLinear(out.in_features, out.out_features, out.bias is not None,
                                                             device="meta"), out)
        return new
    elif kind in RECURRENT:
        new = adopt(kind(**float_kwargs(module), device="meta"), module)
        new._init_flat_weights()  # torch's forward reads the adopted Parameters through this list
        return new
    elif kind is nn.LayerNorm:
        new = nn.LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine, module.bias is not None,
                           device="meta")
    elif kind is nn.GroupNorm:
        new = nn.GroupNorm(module.num_groups, module.num_channels, module.eps, module.affine, device="meta")
    else:
        new = kind(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                   device="meta")
    return adopt(new, module)


def _swap(module: nn.Module, name: str, config: QuantConfig) -> Optional[nn.Module]:
    """The quantized replacement of one module, or None to keep it.

    Only exact nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, nn.Linear, nn.MultiheadAttention, nn.LSTM/GRU/RNN,
    nn.BatchNorm1d/2d/3d, nn.LayerNorm, nn.GroupNorm, nn.ReLU (or q8's versions of them, or their parametrized forms) are
    swapped: a subclass may change forward in ways a quantized
    layer would silently drop.
    """
    kind = _base_type(module)
    if kind not in SUPPORTED:
        return None
    _check_hook_weight_norm(module, name)
    new = _new_layer(module, kind, config.for_layer(name), config)
    if new is None and type(module) in FLOAT_OF:  # a q8 layer the new config keeps in float
        new = _plain(module, kind)
    if new is None or new is module:
        return None
    return new


def convert(
    model: nn.Module, config: QuantConfig, module_filter_fn: Optional[ModuleFilter] = None, strict: bool = False,
) -> nn.Module:
    """Swap nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, nn.Linear, nn.MultiheadAttention, nn.LSTM/GRU/RNN,
    nn.BatchNorm1d/2d/3d, nn.LayerNorm and nn.GroupNorm (and nn.ReLU, when anything is quantized) of
    `model` in place (post-order) and return it; torch's fused float inference paths above a quantized layer are turned off.

    The new layers reuse the original Parameter and buffer objects, so parameter names and
    optimizer references stay valid (each quantized layer adds one `act_range` buffer to the
    state_dict); hooks, parametrizations (torch.nn.utils.parametrizations) and train/eval mode
    are kept; a module reused under several names is converted once. A model converted
    before is converted again to the new config, never mixed. module_filter_fn(module, fqn) ->
    False keeps a layer as it is (config.overrides can instead keep it in float while still
    swapping it). An override pattern that matches no layer is a ValueError.

    Logs one line of coverage(model); strict=True raises ValueError when a module with
    parameters stays in float because q8 has no quantized version of its type.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"convert needs a q8.QuantConfig, got {type(config).__name__}")
    done: dict[int, tuple[nn.Module, str]] = {}  # id(original) -> (replacement, first name)
    matched: set[str] = set()

    def visit(module: nn.Module, prefix: str) -> nn.Module:
        if id(module) in done:
            new, first = done[id(module)]
            if _base_type(module) in SUPPORTED and config.for_layer(prefix) != config.for_layer(first):
                raise ValueError(f"{first} and {prefix} are one module shared under two names, and config.overrides "
                                 "give them different quantization; give them one")
            return new
        for name, child in list(module._modules.items()):  # named_children() hides a second name
            if child is None or isinstance(module, WHOLE):
                continue
            fqn = f"{prefix}.{name}" if prefix else name
            new = visit(child, fqn)
            if new is not child:
                setattr(module, name, new)
        result = module
        if module_filter_fn is None or module_filter_fn(module, prefix):
            if _base_type(module) in SUPPORTED and _base_type(module) is not nn.ReLU:
                matched.update(p for p in config.overrides if prefix and fnmatch.fnmatchcase(prefix, p))
            result = _swap(module, prefix, config) or module
        done[id(module)] = (result, prefix)
        return result

    model = visit(model, "")
    _fused_inference(model)
    unused = [p for p in config.overrides if p not in matched]
    if unused:
        names = [n for n, m in model.named_modules() if _base_type(m) in SUPPORTED and _base_type(m) is not nn.ReLU]
        raise ValueError(f"config.overrides pattern(s) {unused} match no convertible layer; layer names look like "
                         f"{names[:4]}")
    report = coverage(model)
    log.info("%s", report.summary())
    if strict and report.unsupported:
        raise ValueError(f"q8.convert(strict=True): {report.summary()}")
    return model


def unconvert(model: nn.Module) -> nn.Module:
    """The float model back: every q8 layer becomes its torch layer, holding the same Parameters
    and buffers (act_range is dropped). Load a q8 checkpoint into a float model with
    `unconvert(convert(float_model, cfg)).load_state_dict(...)` or `float_state_dict`."""
    done: dict[int, nn.Module] = {}

    def visit(module: nn.Module) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        for name, child in list(module._modules.items()):
            if child is None or isinstance(module, WHOLE):
                continue
            new = visit(child)
            if new is not child:
                setattr(module, name, new)
        kind = _base_type(module)
        done[id(module)] = _plain(module, kind) if type(module) in FLOAT_OF or (
            parametrize.is_parametrized(module) and type(module).__bases__[0] in FLOAT_OF) else module
        return done[id(module)]

    model = visit(model)
    _fused_inference(model)
    return model


def float_state_dict(state_dict: dict) -> dict:
    """A q8 model's state_dict without q8's own buffers (act_range): loads into the float model."""
    return {k: v for k, v in state_dict.items() if not k.endswith("act_range")}


@dataclass
class Coverage:
    """What of a model is quantized, counted over modules that own parameters."""

    quantized: Counter = field(default_factory=Counter)  # type name -> modules
    float_by_config: Counter = field(default_factory=Counter)  # q8 could, the config keeps it float
    unsupported: Counter = field(default_factory=Counter)  # no quantized version of this type
    # swapped, but a forward of an example never called it (its parent reads its weights): float in effect
    bypassed: Counter = field(default_factory=Counter)
    bypassed_names: list = field(default_factory=list)
    params: Counter = field(default_factory=Counter)  # ("quantized" | "float_by_config" | "unsupported", type) -> count

    def share(self) -> float:
        total = sum(self.params.values())
        return sum(v for (k, _), v in self.params.items() if k == "quantized") / total if total else 1.0

    def summary(self) -> str:
        total = sum(self.params.values())
        q = sum(self.quantized.values())
        n = q + sum(self.float_by_config.values()) + sum(self.unsupported.values()) + sum(self.bypassed.values())
        line = f"q8.convert: {q} of {n} layers with parameters quantized ({100 * self.share():.1f}% of {total:,} parameters)"
        parts = [f"{c} {t} ({self.params['unsupported', t]:,} params)" for t, c in sorted(self.unsupported.items())]
        if parts:
            line += "; float, no q8 version: " + ", ".join(parts)
        if self.float_by_config:
            line += "; float by config: " + ", ".join(f"{c} {t}" for t, c in sorted(self.float_by_config.items()))
        if self.bypassed:
            names = ", ".join(self.bypassed_names[:3]) + (", ..." if len(self.bypassed_names) > 3 else "")
            line += ("; BYPASSED, float in effect (swapped, but forward never calls them: the parent reads their "
                     "weights itself): " + ", ".join(f"{c} {t}" for t, c in sorted(self.bypassed.items())) + f" ({names})")
        return line

    def as_dict(self) -> dict:
        return {
            "quantized_share_of_parameters": self.share(),
            "quantized": dict(self.quantized), "float_by_config": dict(self.float_by_config),
            "unsupported": dict(self.unsupported), "bypassed": dict(self.bypassed),
            "bypassed_layers": list(self.bypassed_names),
            "parameters": {f"{k}/{t}": v for (k, t), v in sorted(self.params.items())},
            "summary": self.summary(),
        }


def coverage(model: nn.Module, example: Optional[Tensor] = None) -> Coverage:
    """Which layers of `model` are quantized, which stay float by the config, and which stay
    float because q8 has no quantized version of their type (by type, with parameter counts).
    Every module counts its own parameters (a parametrized layer: its parametrizations'
    originals too), and the layers inside a module q8 has no version of are counted each on its
    own: a block that holds a parameter of its own (ConvNeXt's layer scale) besides quantized
    convolutions and linears reports those as quantized.

    example: an input batch. One training-mode forward of it (q8.diagnostics.uncalled_layers: no
    gradients, nothing changed) finds swapped layers that forward never calls, because their parent
    reads their weights itself (torchvision's Swin attention): they are reported as bypassed."""
    report = Coverage()
    seen: set[int] = set()
    uncalled = uncalled_layers(model, example) if example is not None else set()
    names = {id(m): n for n, m in model.named_modules()}

    def visit(module: nn.Module) -> None:
        if id(module) in seen or isinstance(module, parametrize.ParametrizationList):
            return  # a shared module counts once; parametrizations count with their layer
        seen.add(id(module))
        kind = _base_type(module)
        if parametrize.is_parametrized(module) or isinstance(module, WHOLE):
            own = sum(p.numel() for p in module.parameters())
        else:
            own = sum(p.numel() for p in module.parameters(recurse=False))
        if own:
            if kind not in SUPPORTED:
                key = "unsupported"
            elif module in uncalled:
                key = "bypassed"
                report.bypassed_names.append(names[id(module)])
            else:  # Range BN in float is float too: nothing of it is quantized
                key = "quantized" if isinstance(module, ActivationRange) and not module.spec.is_float else "float_by_config"
            getattr(report, key)[kind.__name__] += 1
            report.params[key, kind.__name__] += own
        if not isinstance(module, WHOLE):
            for child in module.children():
                visit(child)

    visit(model)
    return report
