"""Quantized layers: QConv1d/2d/3d, QConvTranspose1d/2d/3d, QLinear, QMultiheadAttention (gradients
bifurcation), RangeBatchNorm1d/2d/3d, QBatchNorm1d/2d/3d, QLayerNorm, QGroupNorm.

Each layer type keeps its arithmetic in one autograd Function; the products it needs live in an
Ops object (ConvOps, ConvTransposeOps, LinearOps, PackedLinearOps), which is the seam where an integer backend plugs in.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .config import LayerQuant
from . import kernels
from .quantize import (GRAD_RANGE_DIMS, Codes, SampleRotation, channel_range, fake_quantize, quantize, quantize_grad,
                       quantize_gradient, quantize_tensor, quantize_with_codes, rounding_seed, sample_mean_range,
                       tensor_range, uniform_noise)

FLOAT_SPEC = LayerQuant(weight_bits=None, act_bits=None, grad_bits=None, grad_weight_bits=None)


class GradientCopies:
    """Q_grad_bits(g) and Q_grad_weight_bits(g): the two copies of gradients bifurcation, made one
    at a time and, where asked, one slice of rows (samples) at a time, so a layer's backward never
    holds a full-size copy: the range is g's whole range (or per sample / channel), measured once.

    Stochastic copies share one draw: the weight-gradient copy dithers with the low 16 bits of
    the 24-bit uniform the input-gradient copy uses (frac(256 u)), so each copy is unbiased
    and the second draw, the largest cost of simulated 8-bit training on a CPU, is saved. The
    fused kernels hash u from (seed, element index), so any slice, in any order, gets the values
    it would get at once; the eager path draws u once for all of g. Without bifurcation both
    products use the same copy (the same bits, the same u). grad_range="hadamard" rounds g rotated
    (one rotation for both copies, held whole: rotation mixes values within a sample, never across).
    """

    def __init__(self, g: Tensor, spec: LayerQuant):
        self.g, self.spec = g, spec
        dim = GRAD_RANGE_DIMS[spec.grad_range] if g.dim() >= 2 else None
        self.per_row = dim == 0  # one range per sample: a slice of rows takes its own
        stochastic = spec.grad_rounding == "stochastic"
        bits = (spec.grad_bits, spec.grad_weight_bits)
        # grad_range="hadamard": the copies round g rotated (each sample on its own), then rotate back
        rotate = spec.grad_range == "hadamard" and dim is not None and bits != (None, None) and g.numel() > 0
        self.rotation = SampleRotation(g) if rotate else None
        self.rotated = self.rotation.apply(g) if self.rotation else g
        self.lo = self.hi = None  # no copy quantized (float layer gradients): no range to measure
        if bits != (None, None):
            self.lo, self.hi = tensor_range(g) if dim is None else channel_range(self.rotated, dim)
        # fused for every range: per-sample and per-channel ranges broadcast in the kernels as the
        # tensor range does, and a rotated gradient is rounded as any other, then rotated back
        self.fused = stochastic and kernels.fused() and g.numel() > 0
        self.seed = rounding_seed(g, "stochastic") if self.fused else None
        self.noise = None
        if stochastic and not self.fused and bits != (None, None):
            # q8's scratch buffer, valid until the next draw: a layer's backward draws nothing else
            self.noise = uniform_noise(g)

    def input(self, rows: Optional[slice] = None) -> Tensor:
        """The copy that back-propagates: Q_grad_bits(g) (of these rows), dithered with u."""
        return self._copy(self.spec.grad_bits, False, rows)

    def weight(self, rows: Optional[slice] = None) -> Tensor:
        """The copy for the weight (and bias) gradient: Q_grad_weight_bits(g), dithered with frac(256 u)."""
        if not self.spec.bifurcated:
            return self._copy(self.spec.grad_bits, False, rows)
        return self._copy(self.spec.grad_weight_bits, True, rows)

    def both(self) -> tuple[Tensor, Tensor]:
        """(input copy, weight copy) of the whole of g at once: one read of g in the fused kernels,
        where a gradient small enough to hold both copies saves the second pass."""
        s = self.spec
        if self.fused and s.bifurcated and None not in (s.grad_bits, s.grad_weight_bits):
            copies = kernels.get("gradient_copies")(self.rotated.detach(), self.lo, self.hi, kernels.top(s.grad_bits, self.g),
                                                    kernels.top(s.grad_weight_bits, self.g), self.seed)
            return tuple(self._rotated_back(copy) for copy in copies)
        return self.input(), self.weight()

    def _copy(self, bits: Optional[int], low_bits: bool, rows: Optional[slice]) -> Tensor:
        if bits is None:
            return self.g if rows is None else self.g[rows]
        g = self.rotated if rows is None else self.rotated[rows]
        lo, hi = (self.lo[rows], self.hi[rows]) if self.per_row and rows is not None else (self.lo, self.hi)
        if self.fused:
            offset = None
            if rows is not None and rows.start:
                offset = torch.tensor(rows.start * (self.g.numel() // self.g.shape[0]), device=g.device)
            kernel = kernels.get("stochastic_low_bits" if low_bits else "stochastic")
            return self._rotated_back(kernel(g.detach(), lo, hi, kernels.top(bits, g), self.seed, offset))
        noise = self.noise if self.noise is None or rows is None else self.noise[rows]
        if noise is not None and low_bits:
            noise = (noise * 256).frac_()
        return self._rotated_back(fake_quantize(g, bits, lo, hi, self.spec.grad_rounding, noise=noise))

    def _rotated_back(self, copy: Tensor) -> Tensor:
        return copy if self.rotation is None else self.rotation.undo(copy, self.g.dtype)


# The backward of a quantized layer runs over slices of its batch when its input holds more than
# this many elements: every temporary (the dequantized input, both gradient copies, the backend's
# scratch) is then slice-sized, and only the input gradient itself is full-size.
BACKWARD_SLICE_ELEMENTS = 1 << 22


def row_slices(n_rows: int, elements: int) -> list[Optional[slice]]:
    """[None] (all at once) or near-equal slices of rows holding at most about
    BACKWARD_SLICE_ELEMENTS elements."""
    parts = min(n_rows, -(-elements // BACKWARD_SLICE_ELEMENTS))
    if parts <= 1:
        return [None]
    size = -(-n_rows // parts)
    return [slice(start, min(start + size, n_rows)) for start in range(0, n_rows, size)]


def gradient_copies(g: Tensor, spec: LayerQuant, need_input: bool = True, need_weight: bool = True) -> tuple:
    """(Q_grad_bits(g), Q_grad_weight_bits(g)), both at once (None where not needed); layers make
    them one at a time with GradientCopies."""
    copies = GradientCopies(g, spec)
    return copies.input() if need_input else None, copies.weight() if need_weight else None


# ---- the running activation range, shared by every quantized layer ---------------------------


class ActivationRange(nn.Module):
    """Mixin: the input range of a layer's activation quantizer.

    Training uses the batch's per-sample-mean min/max and updates a running average
    (PyTorch's momentum convention); evaluation uses the running range. The buffer starts
    as NaN (no batch seen), and a float checkpoint without it loads cleanly.
    """

    def _init_quant(self, spec: LayerQuant, device=None) -> None:
        self.spec = spec
        self.probe: Optional[dict] = None  # set by q8.diagnostics to record tensors
        shape = (2, self.range_channels()) if self.range_channels() else (2,)
        self.register_buffer("act_range", torch.full(shape, float("nan"), device=device))

    def separate_channels(self) -> int:
        """The input channels this layer keeps apart (its products never sum over them), or 0."""
        return 0

    def range_channels(self) -> int:
        """Channels with activation ranges of their own (spec.act_range == "channel" where the layer
        keeps channels apart: a per-input-channel scale factors out of its products), or 0."""
        return self.separate_channels() if self.spec.act_range == "channel" else 0

    def _act_bounds(self, x: Tensor, batch_range: Optional[tuple] = None,
                    track: bool = True) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """batch_range: the batch's sample-mean (lo, hi) when the caller has it already (per
        channel, shape [C], when range_channels()). track=False: training leaves the running
        range to the caller (a recurrent layer folds its steps' ranges in once)."""
        if self.spec.act_bits is None:
            return None, None
        per_channel = self.range_channels() > 0
        if self.training:
            if batch_range is None:
                batch_range = self.batch_range(*sample_channel_extremes(x)) if per_channel else self.batch_range_of(x)
            lo, hi = batch_range
            if track:
                self.track_range(lo, hi)
        elif torch.isnan(self.act_range).any():  # never trained: the batch is all we know
            lo, hi = self.batch_range(*sample_channel_extremes(x)) if per_channel else self.batch_range_of(x)
        else:
            lo, hi = self.act_range[0], self.act_range[1]
        if per_channel:  # broadcast over [N, C, ...]
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return lo.view(shape), hi.view(shape)
        return lo, hi

    def track_range(self, lo: Tensor, hi: Tensor) -> None:
        """Fold a batch's (lo, hi) into the running range (PyTorch's momentum convention)."""
        with torch.no_grad():
            batch = torch.stack([lo, hi]).to(self.act_range.dtype)
            run = self.act_range
            run.copy_(torch.where(torch.isnan(run), batch, torch.lerp(run, batch, self.spec.act_momentum)))

    def batch_range_of(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One (lo, hi) for the whole input, by spec.act_estimator."""
        return tensor_range(x) if self.spec.act_estimator == "batch" else sample_mean_range(x)

    def batch_range(self, highs: Tensor, lows: Tensor) -> tuple[Tensor, Tensor]:
        """(lo, hi) from each (sample, channel)'s max and min ([N, C]): per channel where
        range_channels(), else one for the tensor; by spec.act_estimator."""
        if self.spec.act_estimator == "batch":
            return (lows.amin(0), highs.amax(0)) if self.range_channels() else (lows.amin(), highs.amax())
        return (lows.mean(0), highs.mean(0)) if self.range_channels() else (lows.amin(1).mean(), highs.amax(1).mean())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        key = prefix + "act_range"
        if key in missing:  # a float model's checkpoint: the range will be learned
            missing.remove(key)

    def extra_repr(self) -> str:
        s = self.spec
        bits = f"w={s.weight_bits}, a={s.act_bits}, g={s.grad_bits}, gw={s.grad_weight_bits}"
        return f"{super().extra_repr()}, quant=({bits})"


# ---- products ---------------------------------------------------------------------------------


_CONV_FORWARD = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class ConvOps:
    """The three products of a 1-, 2- or 3-d convolution (as many spatial dims as `stride` has)."""

    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    def forward(self, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        return _CONV_FORWARD[len(self.stride)](x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _backward(self, g: Tensor, x: Tensor, w: Tensor, mask: list) -> tuple:
        # The real input and weight, not expanded stand-ins: the backend would copy those.
        return torch.ops.aten.convolution_backward(
            g, x, w, None, self.stride, self.padding, self.dilation, False, [0] * len(self.stride), self.groups, mask
        )

    def grad_input(self, g: Tensor, x: Tensor, w: Tensor) -> Tensor:
        return self._backward(g, x, w, [True, False, False])[0]

    def grad_weight(self, g: Tensor, x: Tensor, w: Tensor) -> Tensor:
        return self._backward(g, x, w, [False, True, False])[1]

    @staticmethod
    def grad_bias(g: Tensor) -> Tensor:
        return g.sum([0] + list(range(2, g.dim())))

    def out_channels_first(self, w: Tensor) -> Tensor:
        """The weight with output channels along dim 0 (where per-channel ranges are taken)."""
        return w

    def from_out_channels_first(self, v: Tensor, like: Tensor) -> Tensor:
        """The inverse of out_channels_first, shaped like `like`."""
        return v


_CONV_TRANSPOSE_FORWARD = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass(frozen=True)
class ConvTransposeOps(ConvOps):
    """The three products of a transposed convolution (the gradient of a convolution as a layer).
    Its weight is [in, out / groups, ...]: per-output-channel ranges regroup it out-channel first."""

    output_padding: tuple = ()

    def forward(self, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        return _CONV_TRANSPOSE_FORWARD[len(self.stride)](
            x, w, b, self.stride, self.padding, self.output_padding, self.groups, self.dilation)

    def _backward(self, g: Tensor, x: Tensor, w: Tensor, mask: list) -> tuple:
        return torch.ops.aten.convolution_backward(
            g, x, w, None, self.stride, self.padding, self.dilation, True, self.output_padding, self.groups, mask
        )

    def out_channels_first(self, w: Tensor) -> Tensor:
        g = self.groups
        grouped = w.reshape((g, w.shape[0] // g) + tuple(w.shape[1:]))  # [g, in/g, out/g, ...]
        return grouped.transpose(1, 2).reshape((g * w.shape[1], w.shape[0] // g) + tuple(w.shape[2:]))

    def from_out_channels_first(self, v: Tensor, like: Tensor) -> Tensor:
        g = self.groups
        grouped = v.reshape((g, like.shape[1], like.shape[0] // g) + tuple(like.shape[2:]))
        return grouped.transpose(1, 2).reshape(like.shape)


class LinearOps:
    """The three products of a linear layer (any number of leading dimensions)."""

    parts = 1  # layers packed in the weight along dim 0, each with a weight range of its own

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        if x.dim() <= 2:
            return F.linear(x, w, b)
        # F.linear returns a view of a 2-D product for some inputs of more dimensions; written into
        # an output of the full shape, the product is one (BifurcatedProduct's output must not be
        # a view) at no extra copy
        out = x.new_empty(x.shape[:-1] + (w.shape[0],))
        flat = x.reshape(-1, x.shape[-1])
        if b is None:
            torch.mm(flat, w.t(), out=out.view(-1, w.shape[0]))
        else:
            torch.addmm(b, flat, w.t(), out=out.view(-1, w.shape[0]))
        return out

    @staticmethod
    def grad_input(g: Tensor, x: Tensor, w: Tensor) -> Tensor:
        return g.matmul(w)

    @staticmethod
    def grad_weight(g: Tensor, x: Tensor, w: Tensor) -> Tensor:
        return g.reshape(-1, g.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))

    @staticmethod
    def grad_bias(g: Tensor) -> Tensor:
        return g.reshape(-1, g.shape[-1]).sum(0)

    @staticmethod
    def out_channels_first(w: Tensor) -> Tensor:
        return w

    @staticmethod
    def from_out_channels_first(v: Tensor, like: Tensor) -> Tensor:
        return v


@dataclass(frozen=True)
class PackedLinearOps(LinearOps):
    """LinearOps over a weight that packs `parts` layers' weights along dim 0 (attention's query,
    key and value projections in one product): each part is quantized over its own range, as if
    it were its own layer."""

    parts: int = 1


def _record(probe: Optional[dict], key: str, full: Tensor, quantized: Tensor) -> None:
    if probe is not None:
        probe[key] = (full.detach(), quantized.detach())


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a layer's products run in: autocast's when it is on for x's device (the float
    model would run them in it too), else x's own."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _no_autocast(x: Tensor):
    """Products run with explicit dtypes; autocast must not cast them again."""
    kind = x.device.type
    return torch.autocast(kind, enabled=False) if kind in ("cpu", "cuda") else contextlib.nullcontext()


def _as(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class BifurcatedProduct(torch.autograd.Function):
    """y = op(Q_a(x), Q_w(W)) + b, computed once; backward with two gradient copies.

    g_in  = Q_grad_bits(g)        -> input gradient  (the sequential back-propagation path)
    g_w   = Q_grad_weight_bits(g) -> weight and bias gradients (off the critical path)
    Activation and weight quantizers are straight-through. Quantization (ranges, rounding,
    noise) is computed in float32 at least; the products run in compute_dtype (autocast's under
    mixed precision), and every gradient returns in its input's own dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, ops, spec: LayerQuant, act_lo, act_hi, probe):
        dtype = compute_dtype(x)
        wq = _quantize_weight(weight, spec, ops)
        ctx.wq, ctx.ops, ctx.spec, ctx.probe = _as(wq, dtype), ops, spec, probe
        ctx.dtype, ctx.x_dtype, ctx.w_dtype, ctx.x_shape = dtype, x.dtype, weight.dtype, x.shape
        ctx.b_dtype = bias.dtype if bias is not None else None
        _record(probe, "weight", weight, wq)
        if spec.act_bits is None:
            ctx.save_for_backward(x)
            _record(probe, "activation", x, x)
            if probe is not None:
                probe["input"] = x.detach()
            with _no_autocast(x):
                return _not_a_view(ops.forward(_as(x, dtype), ctx.wq, _as(bias, dtype)))
        # A large input is quantized and multiplied a slice of samples at a time, so the float
        # copy of the quantized input (and the backend's scratch) is slice-sized; what is kept
        # for backward is the 8-bit codes, not a float copy: the saved input shrinks 4x.
        parts = row_slices(x.shape[0], x.numel()) if x.dim() > 1 and probe is None else [None]
        out = codes = None
        for rows in parts:
            xq, x_codes = quantize_with_codes(x if rows is None else x[rows], spec.act_bits, act_lo, act_hi, spec.act_rounding)
            with _no_autocast(x):
                y = ops.forward(_as(xq, dtype), ctx.wq, _as(bias, dtype))
            if rows is None:
                out, codes = y, x_codes.codes
                break
            if out is None:
                out = y.new_empty((x.shape[0],) + y.shape[1:])
                codes = x_codes.codes.new_empty(x.shape)
            out[rows], codes[rows] = y, x_codes.codes
        ctx.save_for_backward(codes, x_codes.lo, x_codes.scale)
        if probe is not None:
            _record(probe, "activation", x, xq)
            probe["input"] = x.detach()
            # the share of inputs outside the quantizer's range, which it clips (their gradient
            # still passes straight through)
            probe["clipped"] = float(((x < act_lo) | (x > act_hi)).float().mean())
        return _not_a_view(out)

    @staticmethod
    def backward(ctx, g):
        spec, ops, dtype = ctx.spec, ctx.ops, ctx.dtype
        saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.b_dtype is not None
        copies = GradientCopies(g, spec)
        probe = ctx.probe
        # slices of the batch for a large input (diagnostics record whole tensors: all at once)
        parts = row_slices(g.shape[0], math.prod(ctx.x_shape)) if g.dim() > 1 and probe is None else [None]
        grad_x = torch.empty(ctx.x_shape, dtype=ctx.x_dtype, device=g.device) if need_x and len(parts) > 1 else None
        grad_w = grad_b = None
        # a gradient of one slice: both copies from one pass; of several: one copy of one slice at a time
        both = copies.both() if len(parts) == 1 and need_x and (need_w or need_b) else None
        with _no_autocast(g):
            for rows in parts:
                xq = _saved_input(saved, dtype, rows)
                # the weight-gradient copy first, then the input's: one copy alive at a time
                if need_w or need_b:
                    g_w = copies.weight(rows) if both is None else both[1]
                    if need_w:
                        grad_w = _accumulate(grad_w, ops.grad_weight(_as(g_w, dtype), xq, ctx.wq))
                    if need_b:
                        grad_b = _accumulate(grad_b, ops.grad_bias(g_w))
                    del g_w
                if need_x:
                    g_in = copies.input(rows) if both is None else both[0]
                    both = None
                    part = ops.grad_input(_as(g_in, dtype), xq, ctx.wq)
                    if rows is None:
                        grad_x = _as(part, ctx.x_dtype)
                    else:
                        grad_x[rows] = part
                    if probe is not None:
                        _record(probe, "layer_grad", g, g_in)
                    del g_in
            grad_w, grad_b = _as(grad_w, ctx.w_dtype), _as(grad_b, ctx.b_dtype)
            if probe is not None and grad_w is not None:
                full = ops.grad_weight(_as(g, dtype), _as(probe["input"], dtype), ctx.wq)
                _record(probe, "weight_grad", full, grad_w)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _not_a_view(out: Tensor) -> Tensor:
    """The product itself, copied where an Ops returned a view (torch's unbatched convolution
    would): autograd refuses in-place ops on a view made inside a custom Function, and a
    ReLU(inplace=True) after the layer is one. Not under torch.compile, where the check would
    break the graph (q8's own Ops return no views)."""
    if torch.compiler.is_compiling():
        return out
    return out.clone() if out._is_view() else out


def _quantize_weight(weight: Tensor, spec: LayerQuant, ops) -> Tensor:
    """Q_weight_bits(W) over its whole range (each packed layer's own), or one range per output channel."""
    if spec.weight_range != "channel" or spec.weight_bits is None:
        parts = getattr(ops, "parts", 1)
        if parts > 1 and spec.weight_bits is not None:
            return quantize_tensor(weight.reshape(parts, -1), spec.weight_bits, spec.weight_rounding, 0).view_as(weight)
        return quantize_tensor(weight, spec.weight_bits, spec.weight_rounding)
    per_out = quantize_tensor(ops.out_channels_first(weight), spec.weight_bits, spec.weight_rounding, 0)
    return ops.from_out_channels_first(per_out, weight)


def _saved_input(saved: tuple, dtype: torch.dtype, rows: Optional[slice]) -> Tensor:
    """The layer's quantized input (of these rows), from its saved codes or the saved float input."""
    if len(saved) == 3:
        codes, lo, scale = saved
        return Codes(codes if rows is None else codes[rows], lo, scale, dtype).dequantize()
    return _as(saved[0] if rows is None else saved[0][rows], dtype)


def _accumulate(total: Optional[Tensor], part: Tensor) -> Tensor:
    """Sum the slices' weight (bias) gradients in float32 at least."""
    if total is None:
        return part.float() if part.dtype in (torch.float16, torch.bfloat16) else part
    return total.add_(part)


class QConvNd(ActivationRange):
    """The quantized convolution of any spatial rank, mixed in before nn.Conv1d / 2d / 3d: quantized
    weights, activations and gradients (gradients bifurcation)."""

    def separate_channels(self) -> int:
        # a depthwise convolution: each output sums over one input channel only
        return self.in_channels if self.groups == self.in_channels > 1 else 0

    def __init__(self, *args, spec: LayerQuant = LayerQuant(), **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(spec, device=self.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.is_float:
            return super().forward(x)  # exactly the torch layer
        spatial = len(self.kernel_size)
        if x.dim() == spatial + 1:  # unbatched (C, ...), as torch's convolutions accept
            return self.forward(x.unsqueeze(0)).squeeze(0)
        lo, hi = self._act_bounds(x)
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x, padding = F.pad(x, self._reversed_padding_repeated_twice, mode=mode), (0,) * spatial
        ops = ConvOps(self.stride, padding, self.dilation, self.groups)
        return BifurcatedProduct.apply(x, self.weight, self.bias, ops, self.spec, lo, hi, self.probe)

    @classmethod
    def from_float(cls, mod: nn.Module, spec: LayerQuant) -> "QConvNd":
        new = cls(
            mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
            mod.groups, mod.bias is not None, mod.padding_mode, spec=spec, device="meta",
        )
        return adopt(new, mod)


class QConv1d(QConvNd, nn.Conv1d):
    """nn.Conv1d, quantized (QConvNd)."""


class QConv2d(QConvNd, nn.Conv2d):
    """nn.Conv2d, quantized (QConvNd)."""


class QConv3d(QConvNd, nn.Conv3d):
    """nn.Conv3d, quantized (QConvNd)."""


class QConvTransposeNd(QConvNd):
    """The quantized transposed convolution of any spatial rank, mixed in before
    nn.ConvTranspose1d / 2d / 3d (decoders, upsampling): as QConvNd, with ConvTransposeOps."""

    def forward(self, x: Tensor, output_size: Optional[list] = None) -> Tensor:
        if self.spec.is_float:
            return super(QConvNd, self).forward(x, output_size)  # exactly the torch layer (past QConvNd's)
        spatial = len(self.kernel_size)
        if x.dim() == spatial + 1:  # unbatched (C, ...), as torch's layers accept
            size = None if output_size is None else list(output_size)[-spatial:]
            return self.forward(x.unsqueeze(0), size).squeeze(0)
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, spatial,
                                              self.dilation)
        lo, hi = self._act_bounds(x)
        ops = ConvTransposeOps(self.stride, self.padding, self.dilation, self.groups, tuple(output_padding))
        return BifurcatedProduct.apply(x, self.weight, self.bias, ops, self.spec, lo, hi, self.probe)

    @classmethod
    def from_float(cls, mod: nn.Module, spec: LayerQuant) -> "QConvTransposeNd":
        new = cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.output_padding,
                  mod.groups, mod.bias is not None, mod.dilation, mod.padding_mode, spec=spec, device="meta")
        return adopt(new, mod)


class QConvTranspose1d(QConvTransposeNd, nn.ConvTranspose1d):
    """nn.ConvTranspose1d, quantized (QConvTransposeNd)."""


class QConvTranspose2d(QConvTransposeNd, nn.ConvTranspose2d):
    """nn.ConvTranspose2d, quantized (QConvTransposeNd)."""


class QConvTranspose3d(QConvTransposeNd, nn.ConvTranspose3d):
    """nn.ConvTranspose3d, quantized (QConvTransposeNd)."""


class QLinear(ActivationRange, nn.Linear):
    """nn.Linear with quantized weights, activations and gradients (gradients bifurcation)."""

    def __init__(self, *args, spec: LayerQuant = LayerQuant(), **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(spec, device=self.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.is_float:
            return super().forward(x)
        lo, hi = self._act_bounds(x)
        return BifurcatedProduct.apply(x, self.weight, self.bias, LinearOps, self.spec, lo, hi, self.probe)

    @classmethod
    def from_float(cls, mod: nn.Linear, spec: LayerQuant) -> "QLinear":
        new = cls(mod.in_features, mod.out_features, mod.bias is not None, spec=spec, device="meta")
        return adopt(new, mod)


class InputRange(ActivationRange):
    """The running range of one more input of a layer with several (attention's key and value)."""

    def __init__(self, spec: LayerQuant, device=None):
        super().__init__()
        self._init_quant(spec, device=device)


def _additive_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A boolean mask (True: may not attend) or an additive float mask, as an additive float mask."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class QMultiheadAttention(ActivationRange, nn.MultiheadAttention):
    """nn.MultiheadAttention whose four projections are quantized products with gradients
    bifurcation: the query, key and value projections (three layers with a weight range each,
    one product when they share one input) and out_proj (a QLinear). The attention products
    themselves (softmax(q k^T / sqrt(d)) v, activation by activation, no weight) run in float in
    the product dtype, as torchao's float8 training leaves them. Its act_range is the query's;
    a key and value of their own take key_range and value_range. Same arguments, masks,
    dropout, bias_k / bias_v, add_zero_attn and outputs as the torch layer."""

    def __init__(self, *args, spec: LayerQuant = LayerQuant(), **kwargs):
        super().__init__(*args, **kwargs)
        device = self.out_proj.weight.device
        self._init_quant(spec, device=device)
        self.key_range, self.value_range = InputRange(spec, device), InputRange(spec, device)
        self.out_proj = QLinear.from_float(self.out_proj, spec)

    def _project(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], parts: int, source: ActivationRange) -> Tensor:
        lo, hi = source._act_bounds(x)
        ops = LinearOps if parts == 1 else PackedLinearOps(parts)
        return BifurcatedProduct.apply(x, weight, bias, ops, self.spec, lo, hi, None)

    def _projections(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        e, b = self.embed_dim, self.in_proj_bias
        bias = [None] * 3 if b is None else [b[:e], b[e:2 * e], b[2 * e:]]
        if not self._qkv_same_embed_dim:
            weights = [self.q_proj_weight, self.k_proj_weight, self.v_proj_weight]
        else:
            w = self.in_proj_weight
            if query is key and key is value:  # self-attention: one product over the packed weight
                return self._project(query, w, b, 3, self).chunk(3, dim=-1)
            if key is value:
                k, v = self._project(key, w[e:], None if b is None else b[e:], 2, self.key_range).chunk(2, dim=-1)
                return self._project(query, w[:e], bias[0], 1, self), k, v
            weights = [w[:e], w[e:2 * e], w[2 * e:]]
        return (self._project(query, weights[0], bias[0], 1, self), self._project(key, weights[1], bias[1], 1, self.key_range),
                self._project(value, weights[2], bias[2], 1, self.value_range))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if self.spec.is_float:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                                   is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("QMultiheadAttention: is_causal=True is a hint that attn_mask is the causal mask; "
                               "pass attn_mask as well (as torch's MultiheadAttention needs)")
        batched = query.dim() == 3
        same_kv, same_qk = key is value, query is key
        if not batched:  # (L, E): one sample
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # keep the identities that say which inputs are one tensor (transposes made new ones)
        key = query if same_qk else key
        value = key if same_kv else value
        q, k, v = self._projections(query, key, value)
        n, length, e = q.shape
        heads, d = self.num_heads, self.head_dim
        dtype = q.dtype
        mask = _additive_mask(attn_mask, dtype)
        if mask is not None and mask.dim() == 3:  # (N * heads, L, S)
            mask = mask.view(n, heads, length, -1)
        pad = _additive_mask(key_padding_mask, dtype)
        if self.bias_k is not None:  # one more key and value, learned, that every query sees
            k = torch.cat([k, self.bias_k.to(dtype).expand(n, 1, e)], dim=1)
            v = torch.cat([v, self.bias_v.to(dtype).expand(n, 1, e)], dim=1)
            mask = None if mask is None else F.pad(mask, (0, 1))
            pad = None if pad is None else F.pad(pad, (0, 1))
        q, k, v = (t.reshape(n, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (N, heads, ., d)
        if self.add_zero_attn:  # one more key and value, all zero
            k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
            mask = None if mask is None else F.pad(mask, (0, 1))
            pad = None if pad is None else F.pad(pad, (0, 1))
        if pad is not None:
            pad = pad.view(n, 1, 1, -1)
            mask = pad if mask is None else mask + pad
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-2, -1))
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if p > 0:
                weights = F.dropout(weights, p)
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, e))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1), weights

    @classmethod
    def from_float(cls, mod: nn.MultiheadAttention, spec: LayerQuant) -> "QMultiheadAttention":
        new = cls(mod.embed_dim, mod.num_heads, mod.dropout, mod.in_proj_bias is not None, mod.bias_k is not None,
                  mod.add_zero_attn, mod.kdim, mod.vdim, mod.batch_first, spec=spec, device="meta")
        adopt(new, mod)
        for name in ("key_range", "value_range"):  # a converted layer's ranges stay
            if isinstance(getattr(mod, name, None), InputRange):
                setattr(new, name, adopt(InputRange(spec, "meta"), getattr(mod, name)))
            else:
                setattr(new, name, InputRange(spec, new.act_range.device))
        new.out_proj = QLinear.from_float(mod.out_proj, spec)  # one of its products: quantized with it
        return new


# the hooks a swapped module keeps (forward, backward and state-dict hooks)
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Make `new` stand in for `old`: the very Parameter and buffer objects of `old` (state_dict
    keys and optimizer references stay valid), its parametrizations, hooks and train/eval mode,
    and, for a quantized layer, an act_range buffer on their device (kept if `old` had one)."""
    if parametrize.is_parametrized(old):
        # torch.nn.utils.parametrize gives each parametrized module a class of its own whose
        # properties compute the weight from `parametrizations`: rebuild it over new's class.
        extra = {k: v for k, v in vars(type(old)).items() if k not in ("__dict__", "__weakref__", "__module__", "__doc__")}
        new.__class__ = type(f"Parametrized{type(new).__name__}", (type(new),), extra)
        new.parametrizations = old.parametrizations
    for name in [n for n in new._parameters if n not in old._parameters]:
        del new._parameters[name]  # e.g. a parametrized weight, which is no Parameter
    new._parameters.update(old._parameters)
    new._buffers.update(old._buffers)
    own = new._buffers.get("act_range")
    if isinstance(new, ActivationRange) and (old._buffers.get("act_range") is None or old._buffers["act_range"].shape != own.shape):
        like = next(old.parameters(), next(old.buffers(), torch.empty(0)))
        new._buffers["act_range"] = torch.full(own.shape, float("nan"), device=like.device)
    elif not isinstance(new, ActivationRange):
        new._buffers.pop("act_range", None)
    for attr in _HOOK_DICTS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    new.train(old.training)
    return new


class ReLUFunction(torch.autograd.Function):
    """max(x, 0) that keeps a 1-byte mask for backward instead of a float copy of its output."""

    @staticmethod
    def forward(ctx, x, inplace: bool):
        if inplace:
            ctx.mark_dirty(x)
            x.clamp_min_(0)
            ctx.save_for_backward(x > 0)
            return x  # the very input object: torch.compile checks a dirty input is returned
        out = x.clamp_min(0)
        ctx.save_for_backward(out > 0)
        return out

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g * mask, None


class QReLU(nn.ReLU):
    """nn.ReLU with exactly its gradients, saving a bool mask (1 byte) rather than a float
    output (4 bytes): beside 8-bit codes, a float ReLU output would dominate saved memory."""

    def forward(self, x: Tensor) -> Tensor:
        return ReLUFunction.apply(x, self.inplace)


# ---- Range Batch Normalization ----------------------------------------------------------------

# The reference code's multiplier of 1 / sqrt(2 ln m), recorded without explanation.
REFERENCE_FACTOR = 0.5 * 0.35 * (1 + math.sqrt(math.pi * math.log(4)))


@functools.lru_cache(maxsize=4096)
def expected_range(m: int, constant: str = "exact") -> float:
    """What the range of m standard normal samples is divided by to estimate sigma.

    exact: E[max - min] of m i.i.d. N(0, 1), integrated numerically:
        E[R_m] = integral of 1 - Phi(x)^m - (1 - Phi(x))^m dx.
    paper: sqrt(2 ln m) (the asymptotic growth; leaves the output std near 0.6).
    reference: sqrt(2 ln m) / REFERENCE_FACTOR (the reference code's scale).
    """
    if m < 2:
        raise ValueError(f"Range BN needs at least 2 values per channel (chunk), got {m}")
    if constant == "paper":
        return math.sqrt(2 * math.log(m))
    if constant == "reference":
        return math.sqrt(2 * math.log(m)) / REFERENCE_FACTOR
    if constant != "exact":
        raise ValueError(f"constant must be 'paper', 'reference' or 'exact', got {constant!r}")
    half = 8.0 + math.sqrt(2 * math.log(m))
    x = torch.linspace(-half, half, 32001, dtype=torch.float64)
    integrand = 1 - torch.exp(m * torch.special.log_ndtr(x)) - torch.exp(m * torch.special.log_ndtr(-x))
    return float(torch.trapezoid(integrand, x))


def chunk_sizes(n: int, chunks: int) -> tuple[int, int, int]:
    """Split n values into at most `chunks` near-equal chunks of >= 2 values.

    Returns (k, m, r): k chunks, the first r of size m + 1, the rest of size m.
    """
    k = max(1, min(chunks, n // 2))
    return k, n // k, n % k


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing and keeps the number
def mean_expected_range(n: int, chunks: int, constant: str) -> float:
    """The divisor of the mean chunk range: the mean of the chunks' expected ranges."""
    k, m, r = chunk_sizes(n, chunks)
    return ((k - r) * expected_range(m, constant) + r * (expected_range(m + 1, constant) if r else 0.0)) / k


def _chunk_groups(v: Tensor, chunks: int) -> list[Tensor]:
    """Views [C, count, size] of a [C, n] tensor: the long chunks first, then the short ones."""
    n = v.shape[1]
    k, m, r = chunk_sizes(n, chunks)
    split = r * (m + 1)
    groups = [v[:, :split].reshape(v.shape[0], r, m + 1)] if r else []
    if k > r:
        groups.append(v[:, split:].reshape(v.shape[0], k - r, m))
    return groups


def _channels_first(x: Tensor) -> Tensor:
    """[N, C, ...] -> [C, N * ...]."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _from_channels_first(v: Tensor, like: Tensor) -> Tensor:
    shape = (like.shape[1], like.shape[0]) + tuple(like.shape[2:])
    return v.reshape(shape).transpose(0, 1)


def _all_reduce(t: Tensor, op, group) -> Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


class _Extrema:
    """Each channel's max and min (per chunk) of Range BN's input, their mean difference, and
    where they sit, so backward can route the range's gradient to those elements.

    The extremes are found in forward, on the input before the activation quantizer: its
    8-bit grid clips the tails (the per-sample-mean range), and the range of the clipped
    values would underestimate sigma (METHOD.md section 3). A tie goes to the first element
    (a valid subgradient of max). Chunks of whole samples (one chunk, or a batch divisible by the
    chunk count): from each (sample, channel)'s max and min (per_sample, or computed here), each
    chunk's extreme and the sample holding it, then the place within that sample; otherwise a
    channels-first copy split into near-equal chunks of any size.
    """

    def __init__(self, x: Tensor, chunks: int, group, per_sample: Optional[tuple] = None):
        C = x.shape[1]
        self.n = x.numel() // C
        self.chunks = chunk_sizes(self.n, chunks)[0]
        world = dist.get_world_size(group) if group is not None else 1
        self.points = []  # (index tuple into x, channel, signed share of the range gradient)
        k, N = self.chunks, x.shape[0]
        if N % k == 0:  # chunks of whole samples: everything follows from the [N, C] extremes
            highs, lows = per_sample if per_sample is not None else sample_channel_extremes(x)
            per = N // k
            channel = torch.arange(C, device=x.device).expand(k, C).flatten()
            self.range_sum = 0
            for sign, per_nc in ((1.0, highs), (-1.0, lows)):
                grouped = per_nc.view(k, per, C)
                ext, which = grouped.max(1) if sign > 0 else grouped.min(1)  # [k, C]: value, sample in the chunk
                ext = ext.to(x.dtype)
                share = torch.full_like(ext, sign)
                if group is not None and k == 1:  # one range per channel over the global batch; ties share
                    local = ext.clone()
                    _all_reduce(ext, dist.ReduceOp.MAX if sign > 0 else dist.ReduceOp.MIN, group)
                    owner = (local == ext).to(ext.dtype)
                    holders = owner.clone()
                    _all_reduce(holders, dist.ReduceOp.SUM, group)
                    share = sign * owner / holders.clamp_min(1)
                self.range_sum = self.range_sum + sign * ext.sum(0)
                sample = (which + torch.arange(k, device=x.device).unsqueeze(1) * per).flatten()
                rows = x[sample, channel].reshape(k * C, -1)  # the holding samples' values: k/N of the input
                flat = rows.argmax(1) if sign > 0 else rows.argmin(1)
                space = torch.unravel_index(flat, tuple(x.shape[2:])) if x.dim() > 2 else ()
                self.points.append(((sample, channel) + tuple(space), channel, share.flatten()))
            if k > 1:
                _all_reduce(self.range_sum, dist.ReduceOp.SUM, group)
            self.total = 1 if k == 1 else k * world  # several chunks are per process
            return
        self.range_sum = x.new_zeros(C)
        offset = 0
        for gr in _chunk_groups(_channels_first(x), chunks):  # [C, count, size] views
            count, size = gr.shape[1], gr.shape[2]
            for sign, reduce in ((1.0, torch.max), (-1.0, torch.min)):
                ext, j = reduce(gr, dim=2)  # [C, count]
                self.range_sum += sign * ext.sum(1)
                c = torch.arange(C, device=x.device).repeat_interleave(count)
                chunk = torch.arange(count, device=x.device).repeat(C)
                position = offset + chunk * size + j.flatten()  # in the channel's n values: (batch, spatial...)
                batch_and_space = torch.unravel_index(position, (x.shape[0],) + tuple(x.shape[2:]))
                where = (batch_and_space[0], c) + tuple(batch_and_space[1:])
                self.points.append((where, c, torch.full((C * count,), sign, dtype=x.dtype, device=x.device)))
            offset += count * size
        _all_reduce(self.range_sum, dist.ReduceOp.SUM, group)
        self.total = self.chunks * world  # chunks are per process

    def mean_range(self) -> Tensor:
        return self.range_sum / self.total

    def add_grad(self, grad_x: Tensor, d_range: Tensor) -> Tensor:
        """grad_x += d_range[c] * d(mean range)/dx at each extreme."""
        per_channel = d_range / self.total
        for where, channel, share in self.points:
            grad_x.index_put_(where, per_channel[channel] * share, accumulate=True)
        return grad_x


def sample_channel_extremes(x: Tensor) -> tuple[Tensor, Tensor]:
    """Max and min of every (sample, channel) of x [N, C, ...]: two [N, C] tensors (float32 at least)."""
    dims = tuple(range(2, x.dim()))
    xf = _as(x.detach(), _stat_dtype(x))
    if not dims:
        return xf, xf
    return xf.amax(dims), xf.amin(dims)


def running_factor(norm: nn.Module) -> float:
    """A batch norm's running-statistics factor for this batch (counting it), PyTorch's convention:
    momentum, or a cumulative average when momentum is None; 0 when nothing is tracked."""
    if not (norm.training and norm.track_running_stats):
        return 0.0
    norm.num_batches_tracked.add_(1)
    return norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)


def _stat_dtype(x: Tensor) -> torch.dtype:
    """Statistics in float32 at least (half precision cannot even hold the value count)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _fused_range_bn_backward(ctx, g: Tensor) -> bool:
    """Range BN's backward runs as two fused kernels for the paper's setting: 8-bit codes saved, the
    output gradient rounded stochastically over its whole range, compiled kernels."""
    return (ctx.has_codes and ctx.grad is not None and ctx.grad[1:] == ("stochastic", "tensor")
            and kernels.fused() and g.numel() > 0)


class RangeBNFunction(torch.autograd.Function):
    """Training-mode Range BN: y = gamma * (x - mu) / s + beta, s = sqrt((range / E)^2 + eps).

    mu is the mean of the (quantized) input that is normalized; range is the mean over chunks
    of max - min of each channel's values before the activation quantizer; E is the matching
    expected range of standard normals (mean_expected_range). With a process group and one
    chunk, mean, max and min are those of the global batch; with several chunks, each process
    contributes its own chunks. The range's gradient goes to the elements at the max and the
    min, split evenly among ties (as torch.amax does). Statistics and arithmetic run in float32
    at least; the output and input gradient keep the input's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps, chunks, constant,
                act: Optional[tuple], grad: Optional[tuple], group, extremes: Optional[tuple] = None,
                divisor: Optional[float] = None):
        x_dtype, dtype = x.dtype, _stat_dtype(x)
        xf = _as(x, dtype)
        if act is not None:
            bits, lo, hi, rounding = act
            xq, codes = quantize_with_codes(xf, bits, lo, hi, rounding)
            ctx.save_for_backward(codes.codes, codes.lo, codes.scale)
        else:
            xq = xf
            ctx.save_for_backward(x)
        C = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        n_local = xq.numel() // C
        sums = torch.stack([xq.sum(dims), xq.new_full((C,), n_local)])
        _all_reduce(sums, dist.ReduceOp.SUM, group)
        mean = sums[0] / sums[1]
        # the global count is only unknown under a process group (which synchronizes anyway)
        n = n_local if group is None else int(sums[1, 0].item())
        extrema = _Extrema(xf, chunks, group, extremes)
        # one range per channel is taken over all n values (of every process); chunks are local
        if divisor is not None:
            pass  # computed by the caller (no process group: n is the local count)
        elif extrema.chunks == 1:
            divisor = mean_expected_range(n, 1, constant)
        else:
            divisor = mean_expected_range(n_local, chunks, constant)
        sigma = extrema.mean_range() / divisor
        s = torch.sqrt(sigma * sigma + eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.lerp_(mean.to(running_mean.dtype), factor)
                running_var.lerp_((sigma * sigma).to(running_var.dtype), factor)
        ctx.stats = (mean, s, sigma, divisor, extrema, n)
        ctx.weight, ctx.x_dtype, ctx.dtype, ctx.grad = weight, x_dtype, dtype, grad
        ctx.has_codes, ctx.has_bias, ctx.group = act is not None, bias is not None, group
        # y = x * a + c with a = gamma / s, c = beta - mean * a: one pass over the input
        a = _as(weight, dtype) / s if weight is not None else 1 / s
        c = -mean * a + (_as(bias, dtype) if bias is not None else 0)
        shape = (1, C) + (1,) * (x.dim() - 2)
        return _as(torch.addcmul(c.view(shape), xq, a.view(shape)), x_dtype)

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors
        dtype = ctx.dtype
        mean, s, sigma, divisor, extrema, n = ctx.stats
        weight, group = ctx.weight, ctx.group
        g = _as(g, dtype)
        C = g.shape[1]
        shape = (1, C) + (1,) * (g.dim() - 2)
        fused = None
        if _fused_range_bn_backward(ctx, g):
            # two passes over g and the saved codes, no full-size temporary: Q(g) is hashed
            # from one seed in both (q8.kernels), the input rebuilt from its codes in the first
            g_lo, g_hi = torch.aminmax(g)
            fused = (g, g_lo, g_hi, kernels.top(ctx.grad[0], g), rounding_seed(g, "stochastic"))
            sum_g, sum_g_xq = kernels.get("range_bn_grad_sums")(*fused, *saved)
        else:
            xq = Codes(*saved, dtype).dequantize() if ctx.has_codes else _as(saved[0], dtype)
            if ctx.grad is not None:
                g = quantize_gradient(g, *ctx.grad)
            dims = [d for d in range(g.dim()) if d != 1]
            sum_g, sum_g_xq = g.sum(dims), (g * xq).sum(dims)
            del xq
        # sums of g and g * y_hat without materializing y_hat = (x - mean) / s
        sum_g_yhat = (sum_g_xq - mean * sum_g) / s
        grad_w = _as(sum_g_yhat, weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = _as(sum_g, weight.dtype if weight is not None else dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = _as(weight, dtype) if weight is not None else torch.ones_like(s)
            sums = torch.stack([w * sum_g, w * sum_g_yhat])  # of gy = g * gamma
            _all_reduce(sums, dist.ReduceOp.SUM, group)
            # dL/ds = -sum(gy * y_hat) / s;  ds/d(range) = sigma / (divisor * s)
            d_range = -sums[1] / s * sigma / (divisor * s)
            # (gy - mean(gy)) / s - y_hat * ... : the range term replaces BN's variance term
            a, b = w / s, -sums[0] / (n * s)
            if fused is not None:
                grad_x = kernels.get("range_bn_grad_input")(*fused, a, b)
            else:
                grad_x = torch.addcmul(b.view(shape), g, a.view(shape))
            grad_x = _as(extrema.add_grad(grad_x, d_range), ctx.x_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None, None, None


class _QuantizedNorm(ActivationRange):
    """Shared by the BN variants (mixed in before nn.BatchNorm1d / 2d / 3d): running-statistics
    factor and construction from the torch layer."""

    def separate_channels(self) -> int:
        return self.num_features  # normalization is per channel

    def _factor(self) -> float:
        return running_factor(self)

    def _eval_forward(self, x: Tensor) -> Tensor:
        """Normalize with the running statistics; input and output gradient quantized."""
        s = self.spec
        if s.act_bits is not None:
            lo, hi = self._act_bounds(x)
            x = quantize(x, s.act_bits, rounding=s.act_rounding, lo=lo, hi=hi)
        y = F.batch_norm(_as(x, _stat_dtype(x)), self.running_mean, self.running_var, self.weight, self.bias,
                         False, 0.0, self.eps)
        return quantize_grad(_as(y, x.dtype), s.grad_bits, s.grad_rounding, s.grad_range)

    @classmethod
    def from_float(cls, mod: nn.Module, spec: LayerQuant, **kwargs) -> "_QuantizedNorm":
        new = cls(mod.num_features, mod.eps, mod.momentum, mod.affine, mod.track_running_stats,
                  spec=spec, device="meta", **kwargs)
        return adopt(new, mod)


class RangeBatchNormNd(_QuantizedNorm):
    """Range Batch Normalization (METHOD.md section 3), a drop-in for nn.BatchNorm1d / 2d / 3d
    (RangeBatchNorm1d / 2d / 3d): statistics per channel (dim 1) over every other dim.

    Parameters and buffers keep nn.BatchNorm's names; running_var holds the running mean of
    the squared range-based scale, so evaluation is plain BN with running statistics.
    chunks: average the range over that many chunks of each channel (any batch shape).
    constant: "paper" | "reference" | "exact" (see expected_range).
    spec: act_bits quantize the input, grad_bits the output gradient (None: float).
    process_group: synchronize statistics over these processes (q8.distributed.sync_norms).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *,
                 chunks: int = 16, constant: str = "exact", spec: LayerQuant = FLOAT_SPEC, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an int >= 1, got {chunks!r}")
        expected_range(2, constant)  # validates the name
        self.chunks, self.constant, self.process_group = chunks, constant, process_group
        self._init_quant(spec, device=None if device == "meta" else device)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training and self.track_running_stats:
            return self._eval_forward(x)
        s = self.spec
        factor = self._factor()
        # Each (sample, channel)'s max and min: one pass each, which gives both the activation
        # quantizer's per-sample-mean range and (one chunk) Range BN's extremes.
        with torch.no_grad():
            highs, lows = sample_channel_extremes(x)
        lo, hi = self._act_bounds(x, self.batch_range(highs, lows))
        act = (s.act_bits, lo, hi, s.act_rounding) if s.act_bits is not None else None
        grad = (s.grad_bits, s.grad_rounding, s.grad_range) if s.grad_bits is not None else None
        group = _norm_group(self)
        # without a process group the divisor follows from the shape: computed here, where
        # torch.compile takes it as a constant (assume_constant_result), not inside the Function
        # (int(): under dynamic shapes, specialize on the count rather than break the graph)
        divisor = mean_expected_range(int(x.numel() // x.shape[1]), self.chunks, self.constant) if group is None else None
        return RangeBNFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var, factor,
                                     self.eps, self.chunks, self.constant, act, grad, group, (highs, lows), divisor)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunks={self.chunks}, constant={self.constant}"


class _AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over the processes of `group`. Every process's loss depends on the sum,
    so the gradient of each process's share is the sum of all processes' gradients."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def global_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                      running_var: Optional[Tensor], factor: float, eps: float, group) -> Tensor:
    """Training-mode batch norm over the global batch of every process in `group`, on any device
    and backend: the per-channel sums, then the sums of squared deviations (two passes: no
    cancellation), are summed over processes with their gradients (_AllReduceSum), so each process
    gets the exact gradient of the global batch's statistics. Running statistics as F.batch_norm
    (unbiased variance)."""
    xf = _as(x, _stat_dtype(x))
    dims, shape = [0] + list(range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)
    total = _AllReduceSum.apply(torch.cat([xf.sum(dims), xf.new_tensor([x.numel() // x.shape[1]])]), group)
    count = total[-1].detach()
    mean = total[:-1] / count
    centered = xf - mean.view(shape)
    var = _AllReduceSum.apply(centered.pow(2).sum(dims), group) / count
    y = centered * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        y = y * weight.view(shape) + bias.view(shape)
    if running_mean is not None and factor:
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), factor)
            running_var.lerp_((var * count / (count - 1).clamp_min(1)).to(running_var.dtype), factor)
    return _as(y, x.dtype)


def _norm_group(layer: nn.Module):
    """The process group a norm synchronizes over now: its own while training under one, else None."""
    group = getattr(layer, "process_group", None)
    return group if group is not None and layer.training and dist.is_available() and dist.is_initialized() else None


class QBatchNormNd(_QuantizedNorm):
    """Standard BN with a quantized input and a quantized output gradient (an ablation), mixed in
    before nn.BatchNorm1d / 2d / 3d. process_group: statistics of the global batch
    (q8.distributed.sync_norms sets it)."""

    def __init__(self, *args, spec: LayerQuant = LayerQuant(), process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group
        self._init_quant(spec, device=None if kwargs.get("device") == "meta" else kwargs.get("device"))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and self.track_running_stats:
            return self._eval_forward(x)
        group = _norm_group(self)
        if group is None:
            return _quantized_around(self, x, super().forward)
        self._check_input_dim(x)
        factor = self._factor()
        return _quantized_around(self, x, lambda v: global_batch_norm(
            v, self.weight, self.bias, self.running_mean, self.running_var, factor, self.eps, group))


class SyncBatchNormNd:
    """Mixed in before nn.BatchNorm1d / 2d / 3d (SyncBatchNorm1d / 2d / 3d): the float batch norm
    with statistics of the global batch while training under process_group (global_batch_norm),
    on every device and backend; torch's nn.SyncBatchNorm runs on GPUs only, and DDP refuses it on
    CPU. Otherwise exactly the torch layer, with its names. q8.distributed.sync_norms puts it in
    place of the float batch norms a config keeps (the float32 baseline's)."""

    process_group = None

    def forward(self, x: Tensor) -> Tensor:
        group = _norm_group(self)
        if group is None:
            return super().forward(x)
        self._check_input_dim(x)
        return global_batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, running_factor(self),
                                 self.eps, group)


class SyncBatchNorm1d(SyncBatchNormNd, nn.BatchNorm1d):
    """nn.BatchNorm1d, synchronized (SyncBatchNormNd)."""


class SyncBatchNorm2d(SyncBatchNormNd, nn.BatchNorm2d):
    """nn.BatchNorm2d, synchronized (SyncBatchNormNd)."""


class SyncBatchNorm3d(SyncBatchNormNd, nn.BatchNorm3d):
    """nn.BatchNorm3d, synchronized (SyncBatchNormNd)."""


def _quantized_around(layer: ActivationRange, x: Tensor, forward) -> Tensor:
    """forward(Q_act_bits(x)), whose output gradient is quantized to grad_bits on its way back: a
    layer without a product (a norm) between quantized layers, at the layer's spec."""
    s = layer.spec
    lo, hi = layer._act_bounds(x)
    if s.act_bits is not None:
        x = quantize(x, s.act_bits, rounding=s.act_rounding, lo=lo, hi=hi)
    return quantize_grad(forward(x), s.grad_bits, s.grad_rounding, s.grad_range)


class _QuantizedIO(ActivationRange):
    """Mixed in before a norm without a q8 statistic of its own (nn.LayerNorm, nn.GroupNorm): a
    quantized input and a quantized output gradient; its statistics stay float32, as in
    QBatchNorm (the paper's Range BN replaces batch statistics only)."""

    def __init__(self, *args, spec: LayerQuant = LayerQuant(), **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(spec, device=None if kwargs.get("device") == "meta" else kwargs.get("device"))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) if self.spec.is_float else _quantized_around(self, x, super().forward)


class QLayerNorm(_QuantizedIO, nn.LayerNorm):
    """nn.LayerNorm, its input and output gradient quantized (_QuantizedIO)."""

    @classmethod
    def from_float(cls, mod: nn.LayerNorm, spec: LayerQuant) -> "QLayerNorm":
        new = cls(mod.normalized_shape, mod.eps, mod.elementwise_affine, mod.bias is not None, spec=spec, device="meta")
        return adopt(new, mod)


class QGroupNorm(_QuantizedIO, nn.GroupNorm):
    """nn.GroupNorm, its input and output gradient quantized (_QuantizedIO)."""

    @classmethod
    def from_float(cls, mod: nn.GroupNorm, spec: LayerQuant) -> "QGroupNorm":
        return adopt(cls(mod.num_groups, mod.num_channels, mod.eps, mod.affine, spec=spec, device="meta"), mod)


class RangeBatchNorm1d(RangeBatchNormNd, nn.BatchNorm1d):
    """Range BN for (N, C) or (N, C, L) input, a drop-in for nn.BatchNorm1d (RangeBatchNormNd)."""


class RangeBatchNorm2d(RangeBatchNormNd, nn.BatchNorm2d):
    """Range BN for (N, C, H, W) input, a drop-in for nn.BatchNorm2d (RangeBatchNormNd)."""


class RangeBatchNorm3d(RangeBatchNormNd, nn.BatchNorm3d):
    """Range BN for (N, C, D, H, W) input, a drop-in for nn.BatchNorm3d (RangeBatchNormNd)."""


class QBatchNorm1d(QBatchNormNd, nn.BatchNorm1d):
    """nn.BatchNorm1d with quantized input and output gradient (QBatchNormNd)."""


class QBatchNorm2d(QBatchNormNd, nn.BatchNorm2d):
    """nn.BatchNorm2d with quantized input and output gradient (QBatchNormNd)."""


class QBatchNorm3d(QBatchNormNd, nn.BatchNorm3d):
    """nn.BatchNorm3d with quantized input and output gradient (QBatchNormNd)."""
