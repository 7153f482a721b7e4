"""Quantized recurrent layers: nn.RNN, nn.LSTM and nn.GRU unrolled in time, every product with a
weight a bifurcated product (8-bit weight and input, 8-bit back-propagated gradient, 16-bit
weight-gradient copy), the gate arithmetic and the LSTM cell state in float."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .config import LayerQuant
from .layers import ActivationRange, BifurcatedProduct, InputRange, LinearOps, _quantize_weight, adopt


class QuantizedWeight(torch.autograd.Function):
    """Q(W) with a straight-through gradient: a weight used at every time step is quantized once
    per forward (not once per step; a stochastic weight rounding draws once, as a layer's would)."""

    @staticmethod
    def forward(ctx, weight, spec: LayerQuant):
        return _quantize_weight(weight, spec, LinearOps)

    @staticmethod
    def backward(ctx, g):
        return g, None


def float_kwargs(mod: nn.RNNBase) -> dict:
    """The constructor arguments of a recurrent layer (nn.RNN, nn.LSTM, nn.GRU or q8's)."""
    kwargs = dict(input_size=mod.input_size, hidden_size=mod.hidden_size, num_layers=mod.num_layers, bias=mod.bias,
                  batch_first=mod.batch_first, dropout=mod.dropout, bidirectional=mod.bidirectional)
    if mod.mode == "LSTM":
        kwargs["proj_size"] = mod.proj_size
    elif mod.mode.startswith("RNN"):
        kwargs["nonlinearity"] = mod.nonlinearity
    return kwargs


class _StepRange:
    """The range of an input that changes every time step (a hidden state): each step is quantized
    over its own batch range in training (the paper's estimator), and the running range takes the
    widest of them once per forward (the first step's state is often all zero); evaluation uses
    the running range."""

    def __init__(self, source: ActivationRange):
        self.source, self.seen = source, []

    def bounds(self, x: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        lo, hi = self.source._act_bounds(x, track=False)
        if self.source.training and lo is not None:
            self.seen.append((lo, hi))
        return lo, hi

    def track(self) -> None:
        if self.seen:
            lows, highs = zip(*self.seen)
            self.source.track_range(torch.stack(lows).amin(), torch.stack(highs).amax())


class QRecurrent(ActivationRange):
    """Mixin before nn.RNN / nn.LSTM / nn.GRU: the same arguments, inputs (batch_first, unbatched,
    PackedSequence, initial states) and outputs, computed step by step with quantized products.

    Ranges: act_range is the first layer's input's; `input_ranges[l - 1]` the input of layer l > 0
    (both directions share it); `hidden_ranges[k]` the hidden state entering the recurrent product
    of layer-direction k (torch's h_n order); `proj_ranges[k]` the LSTM projection's input."""

    def __init__(self, *args, spec: LayerQuant = LayerQuant(), **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(spec, device=self.weight_ih_l0.device)
        self._init_ranges(None)

    def _directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _init_ranges(self, old: Optional[nn.Module]) -> None:
        """InputRange lists for the inputs beyond the first; those of `old` (a converted layer of the
        same shape) are kept."""
        pairs = self.num_layers * self._directions()
        sizes = dict(input_ranges=self.num_layers - 1, hidden_ranges=pairs,
                     proj_ranges=pairs if getattr(self, "proj_size", 0) else 0)
        device = self.act_range.device
        for name, n in sizes.items():
            kept = getattr(old, name, None)
            same = isinstance(kept, nn.ModuleList) and len(kept) == n
            setattr(self, name, nn.ModuleList(adopt(InputRange(self.spec, "meta"), kept[i]) if same
                                              else InputRange(self.spec, device) for i in range(n)))

    def _cell(self, gx: Tensor, gh: Tensor, h: Tensor, c: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """One step of the gate arithmetic from the two products' outputs, in the state's dtype
        (under autocast the products run in its dtype; the recurrence keeps the input's)."""
        gx, gh = gx.to(h.dtype), gh.to(h.dtype)
        if self.mode == "LSTM":
            i, f, g, o = (gx + gh).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        if self.mode == "GRU":
            xr, xz, xn = gx.chunk(3, dim=-1)
            hr, hz, hn = gh.chunk(3, dim=-1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return n + z * (h - n), None
        s = gx + gh
        return (torch.tanh(s) if self.mode == "RNN_TANH" else torch.relu(s)), None

    def _initial_states(self, hx, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(h0, c0) as (layers * directions, N, size); zeros where not given."""
        pairs, n = self.num_layers * self._directions(), x.shape[0]
        out_size = getattr(self, "proj_size", 0) or self.hidden_size
        lstm = self.mode == "LSTM"
        if hx is None:
            h0 = x.new_zeros(pairs, n, out_size)
            return h0, (x.new_zeros(pairs, n, self.hidden_size) if lstm else None)
        return (hx[0], hx[1]) if lstm else (hx, None)

    def _direction(self, layer: int, reverse: bool, x: Tensor, x_bounds: tuple, h: Tensor, c: Optional[Tensor],
                   mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """One layer in one direction over the whole sequence x (N, T, F): outputs (N, T, H_out)
        and the final (h, c)."""
        suffix = f"_l{layer}" + ("_reverse" if reverse else "")
        k = layer * self._directions() + int(reverse)
        spec, once = self.spec, replace(self.spec, weight_bits=None)  # recurrent weights: quantized once
        b_ih, b_hh = (getattr(self, "bias_ih" + suffix), getattr(self, "bias_hh" + suffix)) if self.bias else (None, None)
        # the input's product over all steps at once: one layer input, one range
        gx = BifurcatedProduct.apply(x, getattr(self, "weight_ih" + suffix), b_ih, LinearOps, spec, *x_bounds, None)
        w_hh = QuantizedWeight.apply(getattr(self, "weight_hh" + suffix), spec)
        hidden = _StepRange(self.hidden_ranges[k])
        projected = getattr(self, "proj_size", 0) > 0  # LSTM's h = W_hr (o * tanh(c))
        if projected:
            w_hr, proj = QuantizedWeight.apply(getattr(self, "weight_hr" + suffix), spec), _StepRange(self.proj_ranges[k])
        gx = gx.unbind(1)  # one backward that stacks the steps' gradients (indexing gx[:, t] would fill a
        # gradient of all the steps at every step)
        steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
        outputs: list = [None] * x.shape[1]
        for t in steps:
            gh = BifurcatedProduct.apply(h, w_hh, b_hh, LinearOps, once, *hidden.bounds(h), None)
            h_new, c_new = self._cell(gx[t], gh, h, c)
            if projected:
                h_new = BifurcatedProduct.apply(h_new, w_hr, None, LinearOps, once, *proj.bounds(h_new), None)
            if mask is not None:  # past a sequence's end its state stands still and its output is zero
                m = mask[:, t, None]
                h_new = torch.where(m, h_new, h)
                c_new = None if c is None else torch.where(m, c_new, c)
                outputs[t] = torch.where(m, h_new, 0.0)
            else:
                outputs[t] = h_new
            h, c = h_new, c_new
        hidden.track()
        if projected:
            proj.track()
        return torch.stack(outputs, dim=1), h, c

    def forward(self, input, hx=None):
        if self.spec.is_float:
            return super().forward(input, hx)
        packed = isinstance(input, PackedSequence)
        batched = packed or input.dim() == 3
        mask = None
        if packed:  # padded, in the caller's order (as hx is)
            x, lengths = pad_packed_sequence(input, batch_first=True)
            mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
            mask = mask.to(x.device)
        else:
            if not batched:  # (T, F): one sequence, and states without a batch dimension
                input = input.unsqueeze(0 if self.batch_first else 1)
                hx = None if hx is None else (tuple(t.unsqueeze(1) for t in hx) if isinstance(hx, tuple) else hx.unsqueeze(1))
            x = input if self.batch_first else input.transpose(0, 1)
        h0, c0 = self._initial_states(hx, x)
        # torch's own checks of shapes, with its messages
        self.check_forward_args(input.data if packed else input, h0 if c0 is None else (h0, c0),
                                input.batch_sizes if packed else None)
        finals_h, finals_c = [], []
        for layer in range(self.num_layers):
            source = self if layer == 0 else self.input_ranges[layer - 1]
            bounds = source._act_bounds(x)
            outs = []
            for reverse in range(self._directions()):
                k = layer * self._directions() + reverse
                out, h, c = self._direction(layer, bool(reverse), x, bounds, h0[k], None if c0 is None else c0[k], mask)
                outs.append(out)
                finals_h.append(h)
                finals_c.append(c)
            x = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        h_n = torch.stack(finals_h)
        state = (h_n, torch.stack(finals_c)) if self.mode == "LSTM" else h_n
        if packed:
            order = input.sorted_indices
            padded = x if order is None else x.index_select(0, order)
            sorted_lengths = lengths if order is None else lengths.index_select(0, order.cpu())
            data = pack_padded_sequence(padded, sorted_lengths, batch_first=True).data
            return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), state
        if not batched:
            return x.squeeze(0), (tuple(t.squeeze(1) for t in state) if isinstance(state, tuple) else state.squeeze(1))
        return (x if self.batch_first else x.transpose(0, 1)), state

    @classmethod
    def from_float(cls, mod: nn.RNNBase, spec: LayerQuant) -> "QRecurrent":
        new = adopt(cls(**float_kwargs(mod), spec=spec, device="meta"), mod)
        new._init_ranges(mod)
        new._init_flat_weights()  # torch's own forward (a float spec) reads the adopted Parameters
        return new


class QRNN(QRecurrent, nn.RNN):
    """nn.RNN (tanh or relu) with quantized products and gradients bifurcation."""


class QLSTM(QRecurrent, nn.LSTM):
    """nn.LSTM (proj_size too) with quantized products and gradients bifurcation."""


class QGRU(QRecurrent, nn.GRU):
    """nn.GRU with quantized products and gradients bifurcation."""
