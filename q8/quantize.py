"""The quantizer: uniform asymmetric (GEMMLOWP style) ranges, rounding and codes.

For b bits over [lo, hi] the grid is lo + k * s, k = 0 .. 2^b - 1, s = (hi - lo) / (2^b - 1).

Non-finite input is propagated, never hidden: NaN stays NaN, and a data-derived
range that holds NaN or +-Inf makes every output NaN, so a trainer's non-finite
check sees it. With an explicit finite range, +-Inf clip to the range's ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ROUNDINGS = ("nearest", "stochastic")


def check_bits(bits: int, name: str = "bits") -> None:
    """Raise ValueError unless bits is an int in 1..16."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"{name} must be an int in 1..16, got {bits!r}")


def check_rounding(rounding: str, name: str = "rounding") -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"{name} must be one of {ROUNDINGS}, got {rounding!r}")


def levels(bits: int) -> int:
    """Largest code of a b-bit grid: 2^b - 1."""
    return (1 << bits) - 1


# ---- ranges ---------------------------------------------------------------------------------


def tensor_range(x: Tensor) -> tuple[Tensor, Tensor]:
    """Min and max of the whole tensor (weights, gradients), as 0-d tensors."""
    if x.numel() == 0:
        zero = x.new_zeros(())
        return zero, zero
    return torch.aminmax(x.detach())


def channel_range(x: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """Min and max per index of `dim` (per output channel), shaped to broadcast against x."""
    x = x.detach()
    moved = x.movedim(dim, 0).reshape(x.shape[dim], -1)
    lo, hi = torch.aminmax(moved, dim=1)
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    return lo.view(shape), hi.view(shape)


def sample_mean_range(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over samples (dim 0) of each sample's min and max: activations in training.

    Averaging clips the most extreme samples slightly (the reference code's choice).
    """
    if x.dim() < 2:
        return tensor_range(x)
    lo, hi = torch.aminmax(x.detach().reshape(x.shape[0], -1), dim=1)
    return lo.mean(), hi.mean()


# ---- codes ----------------------------------------------------------------------------------


@dataclass
class Codes:
    """A quantized tensor: value = lo + scale * codes."""

    codes: Tensor
    lo: Tensor
    scale: Tensor
    dtype: torch.dtype = torch.float32

    def dequantize(self) -> Tensor:
        # One formula for every caller, so a tensor rebuilt from stored codes in backward is
        # bit-identical to the one forward used.
        return torch.addcmul(self.lo, self.codes.to(self.scale.dtype), self.scale).to(self.dtype)


def _as_tensor(v, like: Tensor) -> Tensor:
    return v.to(like.dtype) if isinstance(v, Tensor) else torch.tensor(float(v), dtype=like.dtype, device=like.device)


def encode(
    x: Tensor,
    bits: int,
    lo: Tensor | float,
    hi: Tensor | float,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    compact: bool = False,
) -> Codes:
    """Quantize x to b-bit codes over [lo, hi] (no autograd; see `quantize` for the STE op).

    compact=True stores the codes as integers (uint8 up to 8 bits) for saving in backward;
    otherwise they stay float grid positions, which keep NaN.
    """
    x = x.detach()
    work_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xw = x.to(work_dtype)
    lo, hi = _as_tensor(lo, xw), _as_tensor(hi, xw)
    top = levels(bits)
    scale = (hi - lo) / top
    # A zero range (all-zero bias or gradient) has no step: every value maps to code 0, i.e. lo.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = (xw - lo) / safe  # a fresh tensor: the in-place ops below never touch x
    if rounding == "nearest":
        v.round_()
    elif rounding == "stochastic":
        # floor(v + u), u ~ U[0, 1): unbiased inside the range.
        v.add_(torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)).floor_()
    else:
        check_rounding(rounding)
    v.clamp_(0, top)
    if compact:
        # Integer codes cannot hold NaN (it becomes code 0); callers that store codes rely on
        # the forward output, which is NaN already, to stop training.
        v = v.to(torch.uint8 if bits <= 8 else torch.int32)
    return Codes(v, lo, scale, x.dtype)


class _FakeQuantize(torch.autograd.Function):
    """Quantize-dequantize with a straight-through (identity) gradient."""

    @staticmethod
    def forward(ctx, x, bits, rounding, lo, hi, generator):
        return encode(x, bits, lo, hi, rounding, generator).dequantize()

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None


def resolve_range(x: Tensor, lo, hi) -> tuple:
    """Fill a missing end of the range from the data; check an explicit one."""
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi:
        raise ValueError(f"quantize: lo={lo} is above hi={hi}")
    if lo is None or hi is None:
        data_lo, data_hi = tensor_range(x)
        lo = data_lo if lo is None else lo
        hi = data_hi if hi is None else hi
    return lo, hi


def quantize(
    x: Tensor,
    bits: int,
    *,
    rounding: str = "nearest",
    lo: Tensor | float | None = None,
    hi: Tensor | float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Uniform asymmetric quantize-dequantize of x to `bits` over [lo, hi].

    lo / hi default to x.min() / x.max(); they may be tensors that broadcast against x
    (per-channel ranges). Stochastic rounding is unbiased and reproducible with `generator`.
    The gradient is straight-through.
    """
    check_bits(bits)
    check_rounding(rounding)
    if x.numel() == 0:
        return x.clone()
    lo, hi = resolve_range(x, lo, hi)
    return _FakeQuantize.apply(x, bits, rounding, lo, hi, generator)


class _QuantizeGrad(torch.autograd.Function):
    """Identity forward; quantizes the incoming gradient to `bits` over its own min/max."""

    @staticmethod
    def forward(ctx, x, bits, rounding):
        ctx.bits, ctx.rounding = bits, rounding
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        lo, hi = tensor_range(grad)
        return encode(grad, ctx.bits, lo, hi, ctx.rounding).dequantize(), None, None


def quantize_grad(x: Tensor, bits: int | None, rounding: str = "stochastic") -> Tensor:
    """Pass x through unchanged; quantize the gradient that flows back through it."""
    if bits is None:
        return x
    check_bits(bits)
    check_rounding(rounding)
    return _QuantizeGrad.apply(x, bits, rounding)
