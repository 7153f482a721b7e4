"""Fused quantization kernels: one pass per quantization instead of one per elementwise op.

Each kernel is plain torch code that torch.compile (inductor) turns into one C++/OpenMP loop on
CPU and one Triton kernel on GPU: grid position, rounding, clamp, the dequantized values and the
uint8 codes, from a single read of the input. Stochastic rounding draws no random tensor: its
dither is a counter-based hash of (a per-call seed, the element's index), computed inside the
same loop on every core, so the noise costs no extra pass and is reproducible from the seed.

The backend is chosen once per process: Q8_KERNELS=compiled | eager | auto (default: compiled
where a C++ compiler is present, else eager with one line saying so). `set_backend` changes it.
The eager backend is q8/quantize.py's op-by-op path; both give bit-identical round-to-nearest
results (tested), while stochastic rounding draws a different but equally unbiased stream.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import time
from typing import Callable, Optional

import torch
from torch import Tensor

log = logging.getLogger("q8")
BACKENDS = ("auto", "compiled", "eager")
_M32 = 0xFFFFFFFF
_state = {"backend": None, "compiled": {}, "compile_s": 0.0}


def _default_backend() -> str:
    wanted = os.environ.get("Q8_KERNELS", "auto")
    if wanted not in BACKENDS:
        raise ValueError(f"Q8_KERNELS must be one of {BACKENDS}, got {wanted!r}")
    if wanted != "auto":
        return wanted
    if shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++"):
        return "compiled"
    log.warning("q8: no C++ compiler found; quantization runs op by op (eager), slower")
    return "eager"


def backend() -> str:
    """The backend in use: "compiled" or "eager"."""
    if _state["backend"] is None:
        _state["backend"] = _default_backend()
    return _state["backend"]


def set_backend(name: str) -> None:
    """Use the "compiled" or "eager" kernels from now on ("auto": as Q8_KERNELS / the machine says)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _state["backend"] = None if name == "auto" else name


def fused() -> bool:
    """True when quantization runs as the fused kernels: the compiled backend, or any code that
    torch.compile is tracing (a compiled model), where the kernels' code joins the model's graph."""
    return torch.compiler.is_compiling() or backend() == "compiled"


def compile_seconds() -> float:
    """Seconds this process spent compiling kernels at first use (0 when loaded from the cache)."""
    return _state["compile_s"]


# ---- the kernels, as plain torch code --------------------------------------------------------


def hash_uniform(seed: Tensor, like: Tensor, offset: Optional[Tensor] = None) -> Tensor:
    """U[0, 1) on a 2^-24 grid, one per element of `like`: a 32-bit integer hash of (seed, index).
    offset: the index of like's first element in a larger tensor it is a leading slice of, so a
    tensor quantized chunk by chunk gets the very values it would get at once.

    All products stay below 2^63 (32-bit values times multipliers below 2^31), so the int64
    arithmetic never overflows, on any backend.
    """
    index = torch.arange(like.numel(), device=like.device, dtype=torch.int64).view(like.shape)
    if offset is not None:
        index = index + offset
    # mix the index, then mix again with the seed: two calls' streams never line up shifted
    h = _mix32(_mix32(index & _M32) ^ seed)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _mix32(h: Tensor) -> Tensor:
    """A bijective 32-bit integer mixer (xor-shift-multiply rounds)."""
    h = ((h ^ (h >> 16)) * 0x7FEB352D) & _M32
    h = ((h ^ (h >> 15)) * 0x6A09E667) & _M32
    return h ^ (h >> 16)


def _positions(x: Tensor, lo: Tensor, hi: Tensor, top: Tensor, noise: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Grid positions k in 0..top (float) and the step, as q8.quantize.grid_positions computes them.
    top = 2^b - 1 comes as a tensor: one compiled kernel serves every bit-width."""
    xw = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    lo, hi, top = lo.to(xw.dtype), hi.to(xw.dtype), top.to(xw.dtype)
    scale = (hi - lo) / top
    v = (xw - lo) / torch.where(scale > 0, scale, torch.ones_like(scale))
    v = v.round() if noise is None else (v + noise.to(v.dtype)).floor()
    return torch.minimum(v.clamp_min(0), top), scale


def _values(k: Tensor, lo: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (k * scale + lo.to(scale.dtype)).to(dtype)


def k_nearest(x: Tensor, lo: Tensor, hi: Tensor, top: Tensor) -> Tensor:
    """Quantize-dequantize over [lo, hi], round to nearest."""
    k, scale = _positions(x, lo, hi, top, None)
    return _values(k, lo, scale, x.dtype)


def k_stochastic(x: Tensor, lo: Tensor, hi: Tensor, top: Tensor, seed: Tensor, offset: Optional[Tensor] = None) -> Tensor:
    """Quantize-dequantize over [lo, hi], stochastic rounding dithered by hash_uniform(seed, offset)."""
    k, scale = _positions(x, lo, hi, top, hash_uniform(seed, x, offset))
    return _values(k, lo, scale, x.dtype)


def k_nearest_own_range(x: Tensor, top: Tensor) -> Tensor:
    """Round to nearest over x's own min and max (weights)."""
    lo, hi = torch.aminmax(x)
    return k_nearest(x, lo, hi, top)


def k_stochastic_own_range(x: Tensor, top: Tensor, seed: Tensor) -> Tensor:
    """Stochastic rounding over x's own min and max (gradients)."""
    lo, hi = torch.aminmax(x)
    return k_stochastic(x, lo, hi, top, seed)


def k_quantize_with_codes(x: Tensor, lo: Tensor, hi: Tensor, top: Tensor, code_dtype: torch.dtype):
    """(values, integer codes, step) with round to nearest: a layer's forward and what it saves."""
    k, scale = _positions(x, lo, hi, top, None)
    return _values(k, lo, scale, x.dtype), k.to(code_dtype), scale


def k_stochastic_low_bits(x: Tensor, lo: Tensor, hi: Tensor, top: Tensor, seed: Tensor,
                          offset: Optional[Tensor] = None) -> Tensor:
    """k_stochastic dithered with frac(256 u) of the same hash u: the weight-gradient copy of
    gradients bifurcation, which shares the input-gradient copy's draw (q8.layers.GradientCopies)."""
    k, scale = _positions(x, lo, hi, top, (hash_uniform(seed, x, offset) * 256).frac())
    return _values(k, lo, scale, x.dtype)


def k_gradient_copies(g: Tensor, lo: Tensor, hi: Tensor, top_in: Tensor, top_w: Tensor, seed: Tensor) -> tuple[Tensor, Tensor]:
    """Both copies of gradients bifurcation from one read of g: k_stochastic and k_stochastic_low_bits
    with the same seed, in one loop (for a gradient small enough to hold both copies at once)."""
    u = hash_uniform(seed, g)
    k_in, s_in = _positions(g, lo, hi, top_in, u)
    k_w, s_w = _positions(g, lo, hi, top_w, (u * 256).frac())
    return _values(k_in, lo, s_in, g.dtype), _values(k_w, lo, s_w, g.dtype)


def _channel_view(v: Tensor, like: Tensor) -> Tensor:
    return v.view((1, -1) + (1,) * (like.dim() - 2))


def k_range_bn_grad_sums(g: Tensor, g_lo: Tensor, g_hi: Tensor, top: Tensor, seed: Tensor, codes: Tensor,
                         x_lo: Tensor, x_scale: Tensor) -> tuple[Tensor, Tensor]:
    """Range BN backward, first pass: per channel, sum(Q(g)) and sum(Q(g) * x_hat), with Q(g) the
    stochastic quantization of g over [g_lo, g_hi] and x_hat the saved input rebuilt from its codes,
    neither of them materialized."""
    k, step = _positions(g, g_lo, g_hi, top, hash_uniform(seed, g))
    gq = _values(k, g_lo, step, g.dtype)
    xq = _values(codes.to(x_scale.dtype), x_lo, x_scale, g.dtype)
    dims = [0] + list(range(2, g.dim()))
    return gq.sum(dims), (gq * xq).sum(dims)


def k_range_bn_grad_input(g: Tensor, g_lo: Tensor, g_hi: Tensor, top: Tensor, seed: Tensor, a: Tensor,
                          b: Tensor) -> Tensor:
    """Range BN backward, second pass: a[c] * Q(g) + b[c], with Q(g) drawn again from the same seed
    (the same values as the first pass, no stored copy)."""
    k, step = _positions(g, g_lo, g_hi, top, hash_uniform(seed, g))
    return torch.addcmul(_channel_view(b, g), _values(k, g_lo, step, g.dtype), _channel_view(a, g))


KERNELS: dict[str, Callable] = {f.__name__[2:]: f for f in (
    k_nearest, k_stochastic, k_nearest_own_range, k_stochastic_own_range, k_quantize_with_codes, k_stochastic_low_bits,
    k_gradient_copies, k_range_bn_grad_sums, k_range_bn_grad_input)}


def get(name: str) -> Callable:
    """The kernel `name` for the current backend (compiled once per process, timed).

    Compiled without fullgraph: should a new input kind exceed dynamo's recompile limit, that
    call runs the same code op by op (correct, only slower) instead of failing.
    """
    fn = KERNELS[name]
    if torch.compiler.is_compiling() or backend() == "eager":  # a compiled model traces the code itself
        return fn
    compiled = _state["compiled"].get(name)
    if compiled is None:
        canonical = _per_channel_3d if name.startswith("range_bn") else _merged_dims
        compiled = _state["compiled"][name] = _timed(canonical(torch.compile(fn, dynamic=True)), fn)
    return compiled


# Each new rank (and each dimension of size 1) of a kernel's input is a new specialization for
# torch.compile, and past dynamo's recompile limit (8) new ones run op by op: a model with
# linear, convolution, attention and recurrent layers has more than 8. The kernels are
# elementwise (or per channel, Range BN's), so they run on the input's fewest dimensions that
# keep its ranges' broadcasting: a per-tensor range sees a 1-D input, per sample (N, M), per
# channel (N, C, L). Row-major order is kept, so the stochastic rounding's hash of each
# element's index draws what it would on the original shape.


def _merged_dims(kernel: Callable) -> Callable:
    """Call an elementwise kernel (input first, then ranges, scalars) on the input with its
    adjacent dimensions merged wherever every range broadcasts alike, and shape the results back."""

    def call(x: Tensor, *rest):
        ranges = [i for i, a in enumerate(rest) if isinstance(a, Tensor) and a.dim() > 0]
        plan = _merge_plan(tuple(x.shape), tuple(tuple(rest[i].shape) for i in ranges))
        if plan is None:
            return kernel(x, *rest)
        x_shape, range_shapes, back = plan
        args = list(rest)
        for i, shape in zip(ranges, range_shapes):
            args[i] = _alone(rest[i], shape)
        return _shaped_back(kernel(_alone(x, x_shape), *args), back)

    return call


@functools.lru_cache(maxsize=1024)
def _merge_plan(x_shape: tuple, range_shapes: tuple):
    """(x's merged shape, each range's, {merged shape: original}) or None where x stays as it is."""
    rank = len(x_shape)
    padded = [(1,) * (rank - len(shape)) + shape for shape in range_shapes]
    if rank <= 1 or any(len(shape) > rank for shape in padded):
        return None
    groups: list[tuple[tuple, list[int]]] = []
    for d in range(rank):
        if x_shape[d] == 1:  # a dimension of size 1 is no dimension (every range has 1 there)
            continue
        pattern = tuple(shape[d] != 1 for shape in padded)
        if groups and groups[-1][0] == pattern:
            groups[-1][1].append(d)
        else:
            groups.append((pattern, [d]))

    def merged(shape) -> tuple:
        return tuple(math.prod(shape[d] for d in dims) for _, dims in groups)

    def merged_range(shape) -> tuple:  # one value is a 0-d range, however it came shaped
        m = merged(shape)
        return () if math.prod(m) == 1 else m

    back = {merged_range(shape): shape for shape in padded}
    x_merged = merged(x_shape) or (1,)
    back[x_merged] = x_shape
    return x_merged, [merged_range(shape) for shape in padded], back


def _per_channel_3d(kernel: Callable) -> Callable:
    """Call a Range BN kernel (per-channel sums, or a per-channel affine map) with every tensor
    shaped like its input g seen as (N, C, L)."""

    def call(g: Tensor, *rest):
        if g.dim() == 3:
            return kernel(g, *rest)
        shape = (g.shape[0], g.shape[1], math.prod(g.shape[2:]))
        args = [_alone(a, shape) if isinstance(a, Tensor) and a.shape == g.shape else a for a in (g, *rest)]
        return _shaped_back(kernel(*args), {shape: tuple(g.shape)})

    return call


def _alone(t: Tensor, shape) -> Tensor:
    """t reshaped, as a tensor of its own rather than a view: dynamo guards a view's base too, so
    each base's rank would still be a specialization."""
    return t.reshape(shape).detach()


def _shaped_back(out, back: dict):
    """Each result whose shape is a key of `back` gets the shape it maps to."""
    if isinstance(out, tuple):
        return tuple(_shaped_back(o, back) for o in out)
    original = back.get(tuple(out.shape))
    return out if original is None else out.view(original)


def top(bits: int, like: Tensor) -> Tensor:
    """2^b - 1 as a 0-d tensor on like's device (a kernel argument, so no recompile per bit-width)."""
    if torch.compiler.is_compiling():  # a constant of the traced graph (no cache to fill)
        return torch.tensor(float((1 << bits) - 1), device=like.device)
    key = (bits, like.device)
    cached = _tops.get(key)
    if cached is None:
        cached = _tops[key] = torch.tensor(float((1 << bits) - 1), device=like.device)
    return cached


_tops: dict = {}


def _timed(fn: Callable, eager: Callable) -> Callable:
    """Counts the first call of each new specialization (dtype, rank, device) as compile time.
    Should compiling fail (no working compiler, an unsupported device), the process goes on
    with the eager kernels and says so once."""
    seen: set = set()

    def call(*args):
        key = tuple((a.dtype, a.dim(), a.device.type) if isinstance(a, Tensor) else a for a in args)
        if key in seen:
            return fn(*args)
        t0 = time.perf_counter()
        try:
            out = fn(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run op by op
            log.warning("q8: compiling the quantization kernels failed (%s: %s); running them op by op",
                        type(err).__name__, str(err).strip().splitlines()[0] if str(err).strip() else "")
            set_backend("eager")
            return eager(*args)
        _state["compile_s"] += time.perf_counter() - t0
        seen.add(key)
        return out

    return call


def draw_seed(device: torch.device, generator: Optional[torch.Generator]) -> Tensor:
    """A fresh 31-bit seed for one stochastic kernel call, from the rounding stream (q8's own
    generator when seeded, else torch's default one of `device`)."""
    where = generator.device if generator is not None else device
    return torch.randint(0, 2**31 - 1, (), generator=generator, device=where, dtype=torch.int64)
