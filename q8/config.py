"""QuantConfig: what is quantized, to how many bits, how; validated on construction."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .quantize import GRAD_RANGE_DIMS, ROUNDINGS, check_bits

WEIGHT_RANGES = ("tensor", "channel")
# the activation range a training batch gives: the mean over samples of each sample's min and max
# (the paper's; clips the most extreme samples), or the min and max of the whole batch (no clipping)
ACT_ESTIMATORS = ("sample_mean", "batch")
NORMS = ("batch", "range")
RANGE_BN_CONSTANTS = ("paper", "reference", "exact")
FLOAT = "float"  # an override value meaning: this layer stays in float32


def _fail(name: str, value: Any, expected: str) -> None:
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def _check_optional_bits(name: str, value: Any) -> None:
    if value is not None:
        try:
            check_bits(value, name)
        except ValueError:
            _fail(name, value, "an int in 1..16 or None (float)")


@dataclass(frozen=True)
class LayerQuant:
    """The quantization of one layer, after per-layer overrides. None bits mean float32."""

    weight_bits: Optional[int] = 8  # weights in forward and in the input-gradient product
    act_bits: Optional[int] = 8  # inputs of conv / linear / BN
    grad_bits: Optional[int] = 8  # layer gradient copy that back-propagates
    grad_weight_bits: Optional[int] = 16  # layer gradient copy for the weight gradient
    weight_rounding: str = "nearest"
    act_rounding: str = "nearest"
    grad_rounding: str = "stochastic"
    weight_range: str = "tensor"  # "tensor": min/max of the tensor; "channel": per output channel
    act_range: str = "tensor"  # "tensor": the paper's; "channel": per channel where the layer keeps channels apart
    act_estimator: str = "sample_mean"  # "sample_mean": the paper's; "batch": the batch's min and max, no clipping
    # layer gradients: "tensor": the paper's min/max of the whole gradient; "sample" | "channel": one
    # range each; "hadamard": one per sample after a randomized Hadamard rotation (SampleRotation)
    grad_range: str = "tensor"
    act_momentum: float = 0.1  # running activation range: new = (1 - m) * old + m * batch

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits", "grad_bits", "grad_weight_bits"):
            _check_optional_bits(name, getattr(self, name))
        for name in ("weight_rounding", "act_rounding", "grad_rounding"):
            if getattr(self, name) not in ROUNDINGS:
                _fail(name, getattr(self, name), f"one of {ROUNDINGS}")
        if self.weight_range not in WEIGHT_RANGES:
            _fail("weight_range", self.weight_range, f"one of {WEIGHT_RANGES}")
        if self.act_range not in WEIGHT_RANGES:
            _fail("act_range", self.act_range, f"one of {WEIGHT_RANGES}")
        if self.act_estimator not in ACT_ESTIMATORS:
            _fail("act_estimator", self.act_estimator, f"one of {ACT_ESTIMATORS}")
        if self.grad_range not in GRAD_RANGE_DIMS:
            _fail("grad_range", self.grad_range, f"one of {tuple(GRAD_RANGE_DIMS)}")
        m = self.act_momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 1:
            _fail("act_momentum", m, "a number in (0, 1]")

    @property
    def is_float(self) -> bool:
        """True when nothing in this layer is quantized."""
        return all(b is None for b in (self.weight_bits, self.act_bits, self.grad_bits, self.grad_weight_bits))

    @property
    def bifurcated(self) -> bool:
        """True when the weight gradient uses its own copy of the layer gradient."""
        return self.grad_weight_bits != self.grad_bits


LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerQuant))
_FLOAT_LAYER = dict(weight_bits=None, act_bits=None, grad_bits=None, grad_weight_bits=None)


@dataclass(frozen=True)
class QuantConfig(LayerQuant):
    """Model-wide quantization: layer defaults, normalization, and per-layer overrides.

    overrides maps fully-qualified module-name patterns (fnmatch, e.g. "conv1", "layer4.*")
    to either "float" or a dict of LayerQuant fields; later patterns win.
    """

    norm: str = "range"  # "batch": standard BN; "range": Range BN (METHOD.md section 3)
    range_bn_chunks: int = 16  # average the range over this many chunks of each channel (the paper's 16)
    range_bn_constant: str = "exact"  # "paper" | "reference" | "exact"
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm not in NORMS:
            _fail("norm", self.norm, f"one of {NORMS}")
        c = self.range_bn_chunks
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            _fail("range_bn_chunks", c, "an int >= 1")
        if self.range_bn_constant not in RANGE_BN_CONSTANTS:
            _fail("range_bn_constant", self.range_bn_constant, f"one of {RANGE_BN_CONSTANTS}")
        if not isinstance(self.overrides, Mapping):
            _fail("overrides", self.overrides, "a mapping of name pattern -> 'float' or dict")
        base = self.for_layer("")
        for pattern, change in self.overrides.items():
            try:
                dataclasses.replace(base, **self._layer_change(pattern, change))
            except (TypeError, ValueError) as err:
                raise ValueError(f"overrides[{pattern!r}]: {err}") from None

    @staticmethod
    def _layer_change(pattern: str, change: Any) -> dict:
        if not isinstance(pattern, str):
            _fail("overrides key", pattern, "a module-name pattern string")
        if change == FLOAT:
            return dict(_FLOAT_LAYER)
        if not isinstance(change, Mapping):
            _fail(f"overrides[{pattern!r}]", change, "'float' or a dict of layer fields")
        unknown = sorted(set(change) - set(LAYER_FIELDS))
        if unknown:
            raise ValueError(f"overrides[{pattern!r}]: unknown field(s) {unknown}; known: {list(LAYER_FIELDS)}")
        return dict(change)

    def for_layer(self, name: str) -> LayerQuant:
        """The LayerQuant of the module called `name`, overrides applied in order."""
        values = {f: getattr(self, f) for f in LAYER_FIELDS}
        for pattern, change in self.overrides.items():
            if name and fnmatch.fnmatchcase(name, pattern):
                values.update(self._layer_change(pattern, change))
        return LayerQuant(**values)

    @property
    def is_float(self) -> bool:
        return super().is_float and self.norm == "batch" and not self.overrides

    @classmethod
    def preset(cls, name: str, **changes: Any) -> "QuantConfig":
        """A named preset (see PRESETS), with optional field changes."""
        if name not in PRESETS:
            raise ValueError(f"unknown quantization preset {name!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **changes)


PRESETS: dict[str, QuantConfig] = {
    # no quantization, standard BN: the float baseline
    "fp32": QuantConfig(**_FLOAT_LAYER, norm="batch"),
    # the paper: 8-bit W/A/G, 16-bit weight-gradient copy, Range BN
    "int8": QuantConfig(),
    # ablation: one 8-bit gradient copy for both products (no bifurcation)
    "int8_no_bifurcation": QuantConfig(grad_weight_bits=8),
    # the reference code: float32 weight-gradient copy
    "int8_fp32_wgrad": QuantConfig(grad_weight_bits=None),
    # beyond the paper: its int8 with activation ranges from the batch's min and max instead of the
    # mean over samples (which clips the heavy tails of MobileNetV2's linear bottlenecks)
    "int8_batch_range": QuantConfig(act_estimator="batch"),
}
