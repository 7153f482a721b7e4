"""The quantizer: uniform asymmetric (GEMMLOWP style) ranges, rounding and codes.

For b bits over [lo, hi] the grid is lo + k * s, k = 0 .. 2^b - 1, s = (hi - lo) / (2^b - 1).

Non-finite input is propagated, never hidden: NaN stays NaN, and a data-derived
range that holds NaN or +-Inf makes every output NaN, so a trainer's non-finite
check sees it. With an explicit finite range, +-Inf clip to the range's ends.
Finite input over a finite range gives finite output, however tiny the range (a step
below the smallest normal float has no finite inverse, so positions are divided by
the step, not multiplied by its inverse). The one limit: a range wider than the
largest float of the working dtype (e.g. [-3e38, 3e38] in float32) has no grid.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import kernels

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
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    if x.numel() == 0:  # as tensor_range: an empty slice has the range [0, 0]
        zero = x.new_zeros(shape)
        return zero, zero
    lo, hi = torch.aminmax(x.movedim(dim, 0).reshape(x.shape[dim], -1), dim=1)
    return lo.view(shape), hi.view(shape)


def sample_mean_range(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over samples (dim 0) of each sample's min and max: activations in training.

    Averaging clips the most extreme samples slightly (the reference code's choice).
    """
    if x.dim() < 2 or x.numel() == 0:
        return tensor_range(x)
    rows = x.detach().reshape(x.shape[0], -1)
    return rows.amin(1).mean(), rows.amax(1).mean()  # not aminmax(dim=1): 15x slower on CPU


def channel_sample_mean_range(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per channel (dim 1): the mean over samples of each (sample, channel)'s min and max, two [C]
    tensors: the activation range for layers that keep channels apart (act_range="channel")."""
    dims = tuple(range(2, x.dim()))
    x = x.detach()
    if not dims:
        return x.mean(0), x.mean(0)
    return x.amin(dims).mean(0), x.amax(dims).mean(0)


def _fused() -> bool:
    """True when quantization runs as fused kernels (q8.kernels), not op by op."""
    return kernels.fused()


# ---- codes ----------------------------------------------------------------------------------


@dataclass
class Codes:
    """A quantized tensor: value = lo + scale * codes."""

    codes: Tensor
    lo: Tensor
    scale: Tensor
    dtype: torch.dtype = torch.float32

    def dequantize(self) -> Tensor:
        return _to_values(self.codes.to(self.scale.dtype), self.lo, self.scale).to(self.dtype)


def _to_values(positions: Tensor, lo: Tensor, scale: Tensor) -> Tensor:
    # The one formula from grid positions to values, applied in place: forward and a backward
    # that rebuilds the tensor from stored codes get bit-identical values. (Under torch.compile,
    # out of place: in place on a tensor that aliases a saved one cannot be traced.)
    if torch.compiler.is_compiling():
        return positions * scale + lo
    return positions.mul_(scale).add_(lo)


def _as_tensor(v, like: Tensor) -> Tensor:
    return v.to(like.dtype) if isinstance(v, Tensor) else torch.tensor(float(v), dtype=like.dtype, device=like.device)


_scratch = threading.local()


# ---- the stochastic-rounding stream -------------------------------------------------------------


class _RoundingStreams:
    """Generators for stochastic rounding, one per device, seeded from (seed, rank).

    Unseeded, rounding draws from torch's default generator (torch.manual_seed reproduces it).
    Seeded, it draws from streams of its own: every process of a distributed run gets its own
    rounding noise (averaging down over processes) while model initialization and dropout stay
    on the default generator, identical across ranks.
    """

    def __init__(self):
        self.seed: Optional[int] = None
        self.generators: dict[torch.device, torch.Generator] = {}

    def get(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self.generators.get(device)
        if gen is None:
            gen = self.generators[device] = torch.Generator(device=device)
            gen.manual_seed(_mix(self.seed, device.index or 0))
        return gen


_streams = _RoundingStreams()


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby seeds give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def seed_rounding(seed: Optional[int], *salt: int) -> None:
    """Give stochastic rounding its own stream per device, from seed and salt (the process's
    rank, and the step for a stream that needs no state to resume); None: draw from torch's
    default generator again. In a distributed run, every process passes its own rank."""
    _streams.seed = None if seed is None else _mix(seed, *salt, 0x51A8)
    _streams.generators = {}


def rounding_state() -> dict:
    """The stochastic-rounding streams as plain data (a checkpoint can hold it)."""
    return {"seed": _streams.seed, "devices": {str(d): g.get_state() for d, g in _streams.generators.items()}}


def set_rounding_state(state: dict) -> None:
    """Restore what rounding_state() returned (exact resume)."""
    _streams.seed = state["seed"]
    _streams.generators = {}
    for name, gen_state in state.get("devices", {}).items():
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            continue
        gen = _streams.get(device)
        gen.set_state(gen_state)


def uniform_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """U[0, 1) numbers (float32, or float64 for float64 input) shaped like `like`, drawn into a reused buffer: a fresh large
    tensor per call costs more in page faults than the draw itself. Valid until the next call.

    Never half precision: a half-precision draw has too few bits (in bfloat16
    most draws are exactly 0), which would bias a 16-bit copy dithered from the same draw.
    """
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    key = (like.device, dtype)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(key)
    if buf is None or buf.numel() < like.numel():
        buf = buffers[key] = torch.empty(like.numel(), device=like.device, dtype=dtype)
    if generator is None:
        generator = _streams.get(like.device)
    return buf[: like.numel()].view(like.shape).uniform_(generator=generator)


def grid_positions(
    x: Tensor, bits: int, lo, hi, rounding: str = "nearest", generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(k, lo, scale): the integer grid positions of x as a new float tensor, k in 0..2^b - 1.

    noise: the U[0, 1) numbers for stochastic rounding (default: freshly drawn).
    """
    x = x.detach()
    work_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xw = x.to(work_dtype)
    lo, hi = _as_tensor(lo, xw), _as_tensor(hi, xw)
    top = levels(bits)
    scale = (hi - lo) / top
    # A zero range (all-zero bias or gradient) has no step: every value dequantizes to lo.
    # Divide rather than multiply by 1 / scale: a tiny (subnormal) step has no finite inverse.
    v = torch.sub(xw, lo).div_(torch.where(scale > 0, scale, torch.ones_like(scale)))
    if rounding == "nearest":
        v.round_()
    elif rounding == "stochastic":
        # floor(v + u), u ~ U[0, 1): unbiased inside the range.
        v.add_(uniform_noise(v, generator) if noise is None else noise).floor_()
    else:
        check_rounding(rounding)
    return v.clamp_(0, top), lo, scale


def rounding_seed(x: Tensor, rounding: str, generator: torch.Generator | None = None) -> Optional[Tensor]:
    """The seed of a fused kernel's dither (None for round to nearest), from `generator` or the
    rounding stream of x's device."""
    if rounding != "stochastic":
        check_rounding(rounding)
        return None
    if generator is not None:
        return kernels.draw_seed(x.device, generator)
    return torch.ops.q8.draw_seed(x)


@torch.library.custom_op("q8::draw_seed", mutates_args=())
def _draw_seed(like: Tensor) -> Tensor:
    """A seed from the rounding stream of like's device: an op of its own, so torch.compile keeps
    the draw (a generator advancing) in the graph as one opaque call instead of breaking the graph.
    `like` (the tensor to be rounded) makes every call site's draw a distinct call."""
    return kernels.draw_seed(like.device, _streams.get(like.device))


@_draw_seed.register_fake
def _(like: Tensor) -> Tensor:
    return like.new_empty((), dtype=torch.int64)


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def fake_quantize(x: Tensor, bits: int, lo, hi, rounding: str = "nearest", generator=None, noise=None) -> Tensor:
    """Quantize-dequantize without autograd (one new tensor)."""
    if noise is None and _fused() and x.numel():
        like = torch.empty((), dtype=_work_dtype(x), device=x.device)
        lo, hi, top = _as_tensor(lo, like), _as_tensor(hi, like), kernels.top(bits, x)
        seed = rounding_seed(x, rounding, generator)
        if seed is None:
            return kernels.get("nearest")(x.detach(), lo, hi, top)
        return kernels.get("stochastic")(x.detach(), lo, hi, top, seed)
    v, lo, scale = grid_positions(x, bits, lo, hi, rounding, generator, noise)
    return _to_values(v, lo, scale).to(x.dtype)


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
    v, lo, scale = grid_positions(x, bits, lo, hi, rounding, generator)
    if compact:
        v = _compact(v, bits)
    return Codes(v, lo, scale, x.dtype)


def _compact(positions: Tensor, bits: int) -> Tensor:
    # Integer codes cannot hold NaN (it becomes code 0); callers that store codes rely on the
    # forward output, which is NaN already, to stop training.
    return positions.to(torch.uint8 if bits <= 8 else torch.int32)


def quantize_tensor(x: Tensor, bits: int | None, rounding: str, range_dim: int | None = None, noise=None) -> Tensor:
    """Quantize-dequantize over x's own range: the whole tensor's, or one per index of range_dim
    (0: per output channel of a weight, per sample of a gradient; 1: per channel of a gradient).
    None bits = x. A tensor of fewer than 2 dimensions is one slice: it uses its whole range."""
    if bits is None:
        return x
    if x.dim() < 2:
        range_dim = None
    if range_dim is None and noise is None and _fused() and x.numel():
        seed = rounding_seed(x, rounding)
        if seed is None:
            return kernels.get("nearest_own_range")(x.detach(), kernels.top(bits, x))
        return kernels.get("stochastic_own_range")(x.detach(), kernels.top(bits, x), seed)
    lo, hi = tensor_range(x) if range_dim is None else channel_range(x, range_dim)
    return fake_quantize(x, bits, lo, hi, rounding, noise=noise)


# ---- layer-gradient quantizers --------------------------------------------------------------

# grad_range name -> the dimension with one range per index (None: one for the whole tensor);
# "hadamard" takes one range per sample of the rotated gradient (SampleRotation)
GRAD_RANGE_DIMS = {"tensor": None, "sample": 0, "channel": 1, "hadamard": 0}
HADAMARD_BLOCK = 64  # the largest block rotated: wider blocks spread a spike further, at a block-size product per value


def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The n x n Sylvester Hadamard matrix over sqrt(n) (n a power of two): symmetric, orthogonal."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n ** 0.5).to(dtype=dtype, device=device)


class SampleRotation:
    """A randomized Hadamard transform of each sample's values: random signs, then a Hadamard
    matrix over consecutive blocks of the largest power of two dividing a sample's size (at most
    HADAMARD_BLOCK); one draw shared by all samples.

    Orthogonal, so undo(apply(x)) = x and an unbiased quantizer of apply(x), undone, is an
    unbiased quantizer of x. Its use: a heavy-tailed vector (a few large values among many
    small ones, as layer gradients are) becomes near-Gaussian, so its range, and with it the
    rounding error of every value, shrinks (Suresh et al. 2017, "Distributed mean estimation
    with limited communication"; Xi et al. 2023, "Training transformers with 4-bit integers").
    """

    def __init__(self, like: Tensor, generator: torch.Generator | None = None):
        size = like[0].numel() if like.dim() and like.shape[0] else 1
        self.block = min(HADAMARD_BLOCK, size & -size)
        dtype = _work_dtype(like)
        if generator is None:
            generator = _streams.get(like.device)
        bits = torch.randint(0, 2, (size,), generator=generator, device=like.device)
        self.signs = bits.to(dtype).mul_(2).sub_(1)
        self.h = _hadamard(self.block, dtype, like.device)

    def _blocks(self, x: Tensor) -> Tensor:
        return x.to(self.signs.dtype).reshape(x.shape[0], -1, self.block)

    def apply(self, x: Tensor) -> Tensor:
        """x rotated, in the working dtype (float32 for half precision)."""
        signed = self._blocks(x.detach()) * self.signs.view(-1, self.block)
        return torch.matmul(signed, self.h).view(x.shape)

    def undo(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """The inverse of apply, cast to dtype."""
        x = torch.matmul(self._blocks(y), self.h).mul_(self.signs.view(-1, self.block))
        return x.view(y.shape).to(dtype)


def quantize_gradient(g: Tensor, bits: int | None, rounding: str = "stochastic", grad_range: str = "tensor") -> Tensor:
    """A layer gradient quantized over its own range by the grad_range estimator (one of
    GRAD_RANGE_DIMS): the whole tensor's (the paper), one per sample or channel, or one per
    sample after a SampleRotation (undone after rounding)."""
    if bits is None:
        return g
    if grad_range == "hadamard" and g.dim() >= 2 and g.numel():
        rotation = SampleRotation(g)
        return rotation.undo(quantize_tensor(rotation.apply(g), bits, rounding, 0), g.dtype)
    return quantize_tensor(g, bits, rounding, GRAD_RANGE_DIMS[grad_range])


def quantize_with_codes(x: Tensor, bits: int, lo, hi, rounding: str = "nearest") -> tuple[Tensor, Codes]:
    """(values, compact codes) in one pass: what a layer uses in forward and saves for backward."""
    if rounding == "nearest" and _fused() and x.numel():
        like = torch.empty((), dtype=_work_dtype(x), device=x.device)
        lo = _as_tensor(lo, like)
        values, codes, scale = kernels.get("quantize_with_codes")(
            x.detach(), lo, _as_tensor(hi, like), kernels.top(bits, x), torch.uint8 if bits <= 8 else torch.int32)
        return values, Codes(codes, lo, scale, x.dtype)
    v, lo, scale = grid_positions(x, bits, lo, hi, rounding)
    codes = Codes(_compact(v, bits), lo, scale, x.dtype)
    return _to_values(v, lo, scale).to(x.dtype), codes


class _FakeQuantize(torch.autograd.Function):
    """Quantize-dequantize with a straight-through (identity) gradient."""

    @staticmethod
    def forward(ctx, x, bits, rounding, lo, hi, generator):
        return fake_quantize(x, bits, lo, hi, rounding, generator)

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


def quantize_grad(x: Tensor, bits: int | None, rounding: str = "stochastic", grad_range: str = "tensor") -> Tensor:
    """Return x; the gradient that flows back into it is quantized to `bits` by quantize_gradient.

    A tensor hook, not a Function returning a view, so a following in-place op (ReLU(inplace))
    still works; the hook sees the gradient of x's value before any such op.
    """
    if bits is None:
        return x
    check_bits(bits)
    check_rounding(rounding)
    if grad_range not in GRAD_RANGE_DIMS:
        raise ValueError(f"grad_range must be one of {tuple(GRAD_RANGE_DIMS)}, got {grad_range!r}")
    if x.requires_grad:
        x.register_hook(lambda g: quantize_gradient(g, bits, rounding, grad_range))
    return x
