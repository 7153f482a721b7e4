"""Quantization fidelity: cosine similarity and SQNR of quantized tensors, per layer."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import FLOAT_SPEC, ActivationRange, InputRange, QConvNd, QLinear
from .quantize import rounding_state, set_rounding_state

KINDS = ("weight", "activation", "layer_grad", "weight_grad")


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of the angle between two tensors seen as vectors (1.0 when both are zero)."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a.dot(b) / (na * nb))


def sqnr_db(reference: Tensor, quantized: Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|ref|^2 / |ref - q|^2) in dB (inf if equal)."""
    ref = reference.detach().double()
    noise = (ref - quantized.detach().double()).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return float(10 * torch.log10(signal / noise))


def cosine_bound(bits: int, n: int) -> float:
    """METHOD.md section 4: lower bound of cos(w, Q(w)) for n i.i.d. Gaussian entries at `bits`."""
    return 2**bits / (2**bits + math.sqrt(math.log(n)) / math.sqrt(6))


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QConvNd, QLinear))]  # transposed convs too


@contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Run diagnostics without side effects: buffers (running statistics, ranges), specs and
    every random generator they draw from (CPU, each CUDA device, q8's rounding streams) come
    back as they were."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    specs = {m: m.spec for m in model.modules() if isinstance(m, ActivationRange)}
    rounding = rounding_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):  # the CPU generator and every CUDA device's
            yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        for m, spec in specs.items():
            m.spec, m.probe = spec, None
        set_rounding_state(rounding)


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    """Hooks that are removed however the block ends."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def uncalled_layers(model: nn.Module, example: Tensor) -> set[nn.Module]:
    """The quantized layers that one training-mode forward of `example` never calls. Their parent
    reads their weights itself (torchvision's Swin attention passes qkv.weight to F.linear), so
    they compute in float although convert swapped them. No gradients; every buffer and random
    generator is left as it was (synchronized norms: every process must call it)."""
    layers = [m for m in model.modules() if isinstance(m, ActivationRange) and not isinstance(m, InputRange)
              and not m.spec.is_float]
    called: set[int] = set()
    was_training = model.training
    model.train()
    with _preserved(model), torch.no_grad(), _hooks([m.register_forward_hook(lambda m, i, o: called.add(id(m)))
                                                     for m in layers]):
        model(example)
    model.train(was_training)
    return {m for m in layers if id(m) not in called}


def _backward_pass(model, inputs, targets, loss_fn, params) -> dict:
    loss = loss_fn(model(inputs), targets)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return dict(zip(params, grads))


def layer_fidelity(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: Callable = F.cross_entropy
) -> list[dict]:
    """Per quantized layer and tensor kind, for one batch in training mode:

    cosine / sqnr_db: the quantized tensor against its full-precision version at the same
    point of the same pass (the local quantization error);
    shadow_cosine / shadow_sqnr_db: the quantized pass's tensor against the same tensor in a
    full-precision pass of the same model on the same batch (errors accumulated upstream).
    Kinds: weight, activation (layer input), layer_grad (the gradient copy that back-propagates),
    weight_grad. Activation rows also give `clipped`: the share of the input outside the
    quantizer's range. The model's buffers, gradients and RNG state are left untouched.
    """
    layers = quantized_layers(model)
    weights = [m.weight for _, m in layers]
    was_training = model.training
    model.train()
    with _preserved(model):
        for _, m in layers:
            m.probe = {}
        dw_q = _backward_pass(model, inputs, targets, loss_fn, weights)
        probes = {name: m.probe for name, m in layers}
        # Shadow pass: every quantized layer (and norm) computes in float; hooks record tensors.
        for m in model.modules():
            if isinstance(m, ActivationRange):
                m.spec, m.probe = FLOAT_SPEC, None
        shadow: dict[str, dict] = {name: {} for name, _ in layers}
        with _hooks([m.register_forward_hook(_shadow_hook(shadow[name])) for name, m in layers]):
            dw_f = _backward_pass(model, inputs, targets, loss_fn, weights)
    model.train(was_training)

    rows = []
    for name, m in layers:
        probe, sh = probes[name], shadow[name]
        shadow_of = {
            "weight": m.weight,
            "activation": sh.get("activation"),
            "layer_grad": sh.get("layer_grad"),
            "weight_grad": dw_f[m.weight],
        }
        for kind in KINDS:
            if kind not in probe:
                continue
            full, quant = probe[kind]
            if kind == "weight_grad":
                quant = dw_q[m.weight]
            row = dict(layer=name, kind=kind, numel=quant.numel(), cosine=cosine(full, quant), sqnr_db=sqnr_db(full, quant))
            if kind == "activation" and "clipped" in probe:
                row["clipped"] = probe["clipped"]
            ref = shadow_of[kind]
            if ref is not None:
                row.update(shadow_cosine=cosine(ref, quant), shadow_sqnr_db=sqnr_db(ref, quant))
            rows.append(row)
    return rows


def _shadow_hook(store: dict):
    def hook(module, args, output):
        store["activation"] = args[0].detach()
        if output.requires_grad:
            output.register_hook(lambda g: store.__setitem__("layer_grad", g.detach()))

    return hook


def summarize(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean cosine and SQNR per tensor kind over layers, weighted by tensor size."""
    out: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        total = sum(r["numel"] for r in sel)
        out[kind] = {
            key: sum(r[key] * r["numel"] for r in sel) / total
            for key in ("cosine", "shadow_cosine", "clipped")
            if all(key in r for r in sel)
        }
    return out


def collapse_depth(rows: list[dict], threshold: float = 0.9) -> dict[str, int]:
    """Per tensor kind, the depth (index among the quantized layers, in forward order) of the
    first layer whose tensor has lost direction against the full-precision pass: shadow cosine
    below `threshold`; -1 when none has. Where it happens first is where quantization errors
    pile up, and which kind falls first says which quantizer is at fault."""
    order = list(dict.fromkeys(r["layer"] for r in rows))
    out = {}
    for kind in KINDS:
        low = [order.index(r["layer"]) for r in rows
               if r["kind"] == kind and r.get("shadow_cosine", 1.0) < threshold]
        out[kind] = min(low) if low else -1
    return out


def depth_profile_figure(rows: list[dict]):
    """A matplotlib figure: shadow cosine of each tensor kind against layer depth (TensorBoard's
    quant/depth_profile image): a collapse along depth is visible at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(dict.fromkeys(r["layer"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for kind in KINDS:
        pts = [(order.index(r["layer"]), r["shadow_cosine"]) for r in rows if r["kind"] == kind and "shadow_cosine" in r]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=kind)
    ax.set_xlabel("quantized layer (forward order)")
    ax.set_ylabel("cosine vs full precision")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


@torch.no_grad()
def range_bn_scales(model: nn.Module, inputs: Tensor) -> list[dict]:
    """For every Range BN layer, on one batch in training mode: its range-based sigma over its
    input's real standard deviation, per channel (mean, min, max over channels). Near 1 on
    Gaussian data with the exact constant; far from 1 where the input is skewed or heavy-tailed,
    or where one range spans too many values (METHOD.md section 3). Buffers are left untouched."""
    from .layers import RangeBatchNormNd, chunk_sizes, mean_expected_range

    seen: dict[str, Tensor] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, RangeBatchNormNd)]
    was_training = model.training
    with _hooks([m.register_forward_pre_hook(lambda mod, args, name=n: seen.__setitem__(name, args[0].detach()))
                 for n, m in layers]), _preserved(model):
        model.train()
        model(inputs)
    model.train(was_training)
    rows = []
    for name, m in layers:
        x = seen[name].float()
        C = x.shape[1]
        v = x.transpose(0, 1).reshape(C, -1)
        n = v.shape[1]
        k = chunk_sizes(n, m.chunks)[0]
        rng = sum(p.amax(1) - p.amin(1) for p in torch.tensor_split(v, k, dim=1)) / k
        ratio = (rng / mean_expected_range(n, m.chunks, m.constant)) / v.std(1).clamp_min(1e-12)
        rows.append(dict(layer=name, sigma_ratio_mean=float(ratio.mean()), sigma_ratio_min=float(ratio.min()),
                         sigma_ratio_max=float(ratio.max()), values_per_chunk=n // k))
    return rows
