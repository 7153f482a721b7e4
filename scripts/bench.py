"""Training-step time and peak memory: float32 vs q8 int8 vs the reference code's formulation.

    python -m scripts.bench                 # all models, writes results/bench.md
    python -m scripts.bench --models resnet18_cifar --steps 5

Step time: median of --steps timed steps after --warmup, all configurations in one process.
Peak memory: a fresh subprocess per configuration; one warm-up step (kernels compiled or loaded,
optimizer state allocated: once per process, not per step), then on CPU the peak RSS of two steps
(VmHWM, reset before them) over the RSS before them, with glibc returning every tensor-sized block
when it is freed (MALLOC_MMAP_THRESHOLD_), so it measures live memory: activations saved for
backward, gradients, temporaries. On CUDA torch.cuda.max_memory_allocated. The last line gives, for the first model,
`int8/fp32=<x> int8/reference=<y> mem_int8/fp32=<z>`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import q8  # noqa: E402
from q8 import kernels  # noqa: E402
from q8.layers import expected_range  # noqa: E402
from q8.models import build  # noqa: E402
from q8.trainer import cpu_model  # noqa: E402

MODELS = {  # name -> (builder name, input size, batch for time, batch for memory)
    "resnet18_cifar": ("resnet18_cifar", 32, 128, 256),
    "resnet20": ("resnet20", 32, 128, 256),
    "resnet50": ("resnet50", 224, 16, 16),
    "mobilenet_v2": ("mobilenet_v2_cifar", 32, 128, 256),
}
CONFIGS = ("fp32", "int8", "reference")


# ---- the reference code's formulation, written here as the baseline --------------------------


def _act(x: torch.Tensor) -> torch.Tensor:
    lo, hi = q8.sample_mean_range(x)
    return q8.quantize(x, 8, lo=lo, hi=hi)


class RefConv2d(nn.Conv2d):
    """Every product computed twice: out1 (detached input) carries the float32 weight
    gradient, out2 (detached weight, 8-bit gradient quantizer) carries the input gradient."""

    def forward(self, x):
        xq, wq = _act(x), q8.quantize(self.weight, 8)
        out1 = F.conv2d(xq.detach(), wq, self.bias, self.stride, self.padding, self.dilation, self.groups)
        bias = None if self.bias is None else self.bias.detach()  # the bias gradient comes via out1 only
        out2 = F.conv2d(xq, wq.detach(), bias, self.stride, self.padding, self.dilation, self.groups)
        out2 = q8.quantize_grad(out2, 8)
        return out1 + out2 - out1.detach()


class RefLinear(nn.Linear):
    def forward(self, x):
        xq, wq = _act(x), q8.quantize(self.weight, 8)
        out1 = F.linear(xq.detach(), wq, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        out2 = q8.quantize_grad(F.linear(xq, wq.detach(), bias), 8)
        return out1 + out2 - out1.detach()


class RefRangeBN(nn.BatchNorm2d):
    """Range BN with autograd through plain tensor ops (8-bit input and output gradient)."""

    def forward(self, x):
        xq = _act(x)
        n = xq.numel() // xq.shape[1]
        mean = xq.mean((0, 2, 3), keepdim=True)
        centered = xq - mean
        rng = centered.amax((0, 2, 3), keepdim=True) - centered.amin((0, 2, 3), keepdim=True)
        scale = rng / expected_range(n)
        with torch.no_grad():
            self.running_mean.lerp_(mean.flatten(), self.momentum)
            self.running_var.lerp_(scale.flatten() ** 2, self.momentum)
        y = centered / (scale + self.eps) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return q8.quantize_grad(y, 8)


def reference_convert(model: nn.Module) -> nn.Module:
    for name, child in list(model.named_children()):
        kind = type(child)
        if kind is nn.Conv2d:
            new = RefConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                            child.dilation, child.groups, child.bias is not None)
        elif kind is nn.Linear:
            new = RefLinear(child.in_features, child.out_features, child.bias is not None)
        elif kind is nn.BatchNorm2d:
            new = RefRangeBN(child.num_features)
        else:
            reference_convert(child)
            continue
        new.load_state_dict(child.state_dict())
        setattr(model, name, new)
    return model


# ---- measurement -----------------------------------------------------------------------------


def make(config: str, model_name: str, device: torch.device) -> nn.Module:
    builder, size, _, _ = MODELS[model_name]
    torch.manual_seed(0)
    model = build(builder, num_classes=10 if size == 32 else 1000)
    if config == "int8":
        model = q8.convert(model, q8.QuantConfig.preset("int8"))
    elif config == "reference":
        model = reference_convert(model)
    return model.to(device).train()


def step_fn(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def inputs(model_name: str, batch: int, device):
    _, size, _, _ = MODELS[model_name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return x, y


def time_steps(config, model_name, device, warmup, steps) -> tuple[float, float]:
    """(median step time, seconds the first step spent compiling q8's kernels)."""
    batch = MODELS[model_name][2]
    step = step_fn(make(config, model_name, device), *inputs(model_name, batch, device))
    compiled_before = kernels.compile_seconds()
    for _ in range(warmup):
        step()
    compile_s = kernels.compile_seconds() - compiled_before
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), compile_s


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def measure_memory(config, model_name, device) -> int:
    """Run in a fresh process: bytes a training step adds at its peak."""
    batch = MODELS[model_name][3]
    model = make(config, model_name, device)
    x, y = inputs(model_name, batch, device)
    step = step_fn(model, x, y)
    # The first step compiles (or loads) q8's kernels and imports the compiler, and allocates the
    # optimizer's state: a one-time cost of the process, not memory each step needs.
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS: import-time peaks don't count
    for _ in range(2):
        step()
    return _status_bytes("VmHWM") - base


def memory_in_subprocess(config, model_name, device, threads) -> int:
    cmd = [sys.executable, "-m", "scripts.bench", "--measure-memory", config, model_name, "--device", str(device),
           "--threads", str(threads)]
    # Every tensor-sized block gets its own mapping, returned to the system when freed, so
    # the peak RSS is the peak of live memory rather than of the allocator's free lists.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=1800, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["bytes"]


def machine() -> str:
    flags = set()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{cpu_model()}, {os.cpu_count()} CPUs, SIMD: {' '.join(simd) or 'unknown'}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--out", default=str(ROOT / "results" / "bench.md"), help="markdown report ('' for none)")
    p.add_argument("--measure-memory", nargs=2, metavar=("CONFIG", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    compile_s: dict[str, float] = {}
    if args.measure_memory:
        print(json.dumps({"bytes": measure_memory(*args.measure_memory, device)}))
        return

    rows = []
    print(f"machine: {machine()}; q8 kernels: {kernels.backend()}", flush=True)
    for name in args.models:
        timed = {c: time_steps(c, name, device, args.warmup, args.steps) for c in CONFIGS}
        t = {c: v[0] for c, v in timed.items()}
        compile_s[name] = timed["int8"][1]
        m = {} if args.no_memory else {c: memory_in_subprocess(c, name, device, args.threads) for c in CONFIGS}
        rows.append((name, t, m))
        print(f"{name}: " + "  ".join(f"{c} {t[c] * 1000:.0f} ms" for c in CONFIGS)
              + ("" if not m else "  | peak " + "  ".join(f"{c} {m[c] / 2**20:.0f} MiB" for c in CONFIGS)), flush=True)

    header = ("| model | batch (time / memory) | fp32 ms | int8 ms | reference ms | int8/fp32 | int8/reference | "
              "fp32 MiB | int8 MiB | reference MiB | mem int8/fp32 | first-use compile s |")
    lines = [header, "|" + " --- |" * 12]
    for name, t, m in rows:
        _, size, bt, bm = MODELS[name]
        mem = [f"{m[c] / 2**20:.0f}" for c in CONFIGS] + [f"{m['int8'] / m['fp32']:.2f}"] if m else ["-"] * 4
        lines.append(
            f"| {name} {size}x{size} | {bt} / {bm} | " + " | ".join(f"{t[c] * 1000:.0f}" for c in CONFIGS)
            + f" | {t['int8'] / t['fp32']:.2f} | {t['int8'] / t['reference']:.2f} | " + " | ".join(mem)
            + f" | {compile_s[name]:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        cmd = "python -m scripts.bench " + " ".join(argv if argv is not None else sys.argv[1:])
        report = (
            "# Training-step benchmark\n\n"
            "Generated by `scripts/bench.py`; do not edit. Regenerate with `make bench` "
            f"(this run: `{cmd.strip()}`).\n\n"
            f"- machine: {machine()}; device {device}, {args.threads} threads; q8 kernels: {kernels.backend()} "
            "(first-use compile: the warm-up steps' time spent compiling, 0 when inductor's on-disk cache had them)\n"
            f"- versions: python {platform.python_version()}, torch {torch.__version__}\n"
            f"- step time: median of {args.steps} steps after {args.warmup} warm-up steps, one process\n"
            "- peak memory: a fresh process per configuration; after one warm-up step (kernels compiled or loaded, "
            "optimizer state allocated), the peak RSS of two steps over the RSS before them, "
            "with glibc returning freed tensor memory (MALLOC_MMAP_THRESHOLD_=65536) (CPU), or "
            "max_memory_allocated (CUDA)\n"
            "- fp32: the model without q8; int8: q8's paper preset (8-bit W/A/G, 16-bit weight-gradient copy, "
            "Range BN); reference: the reference code's formulation (each product computed twice, float32 "
            "weight gradient), written in scripts/bench.py\n\n" + table + "\n"
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    name, t, m = rows[0]
    mem = f"{m['int8'] / m['fp32']:.2f}" if m else "n/a"
    print(f"int8/fp32={t['int8'] / t['fp32']:.2f} int8/reference={t['int8'] / t['reference']:.2f} mem_int8/fp32={mem}")


if __name__ == "__main__":
    main()
