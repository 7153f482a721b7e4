"""convert(model, config): swap the layers of any float model for their quantized versions."""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from .config import QuantConfig
from .layers import QBatchNorm2d, QConv2d, QLinear, QReLU, RangeBatchNorm2d

ModuleFilter = Callable[[nn.Module, str], bool]


def _swap(module: nn.Module, name: str, config: QuantConfig) -> nn.Module:
    """The quantized replacement of one module, or the module itself.

    Only exact nn.Conv2d / nn.Linear / nn.BatchNorm2d are swapped: a subclass may change
    forward in ways a quantized layer would silently drop.
    """
    kind = type(module)
    if kind is nn.ReLU:  # same gradients, a 1-byte mask saved instead of a float output
        return module if config.is_float else QReLU(module.inplace)
    if kind not in (nn.Conv2d, nn.Linear, nn.BatchNorm2d):
        return module
    spec = config.for_layer(name)
    if kind is nn.Conv2d:
        return QConv2d.from_float(module, spec)
    if kind is nn.Linear:
        return QLinear.from_float(module, spec)
    if config.norm == "range":
        return RangeBatchNorm2d.from_float(
            module, spec, chunks=config.range_bn_chunks, constant=config.range_bn_constant
        )
    if spec.act_bits is not None or spec.grad_bits is not None:
        return QBatchNorm2d.from_float(module, spec)
    return module


def convert(
    model: nn.Module, config: QuantConfig, module_filter_fn: Optional[ModuleFilter] = None
) -> nn.Module:
    """Swap nn.Conv2d, nn.Linear and nn.BatchNorm2d (and nn.ReLU, when anything is quantized)
    of `model` in place (post-order) and return it.

    The new layers reuse the original Parameter and buffer objects, so state_dict keys and
    optimizer references stay valid. module_filter_fn(module, fqn) -> False keeps a layer
    as it is (config.overrides can instead keep it in float32 while still swapping it).
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"convert needs a q8.QuantConfig, got {type(config).__name__}")

    def visit(module: nn.Module, prefix: str) -> nn.Module:
        for name, child in list(module.named_children()):
            fqn = f"{prefix}.{name}" if prefix else name
            new = visit(child, fqn)
            if new is not child:
                setattr(module, name, new)
        if module_filter_fn is not None and not module_filter_fn(module, prefix):
            return module
        return _swap(module, prefix, config)

    return visit(model, "")
