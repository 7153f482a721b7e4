"""Two CPU processes (gloo) against one process on the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import q8
from q8.distributed import sync_norms

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8


# the norms under test, each where every difference would come from the synchronization itself:
NORM_CONFIGS = {
    # Range BN in float, one range per channel (several chunks are per process by design)
    "range_bn": q8.QuantConfig.preset("fp32", norm="range", range_bn_chunks=1),
    # the float32 baseline's nn.BatchNorm (torch's SyncBatchNorm raises on CPU)
    "float_bn": q8.QuantConfig.preset("fp32"),
    # the quantized standard BN of the norm=batch ablation, its output gradient at 16 bits, rounded
    # to nearest (deterministic; each process's range differs by little)
    "quantized_bn": q8.QuantConfig.preset("fp32", overrides={"[14]": {"grad_bits": 16, "grad_rounding": "nearest"}}),
}
NORM_TYPES = {"range_bn": q8.RangeBatchNorm2d, "float_bn": nn.BatchNorm2d, "quantized_bn": q8.QBatchNorm2d}


def make_model(kind="range_bn"):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 5 * 5, 3),
    )
    model = q8.convert(model, NORM_CONFIGS[kind])
    assert type(model[1]) is NORM_TYPES[kind] and type(model[4]) is NORM_TYPES[kind]
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 5, 5, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def step(model, x, y):
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    return grads, stats


def worker(rank, world, init_file, out, kind):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = sync_norms(make_model(kind))
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = batch()
    share = GLOBAL_BATCH // world
    grads, stats = step(ddp, x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])
    if rank == 0:
        strip = lambda d: {k.removeprefix("module."): v for k, v in d.items()}  # noqa: E731
        torch.save({"grads": strip(grads), "stats": strip(stats)}, out)
    dist.barrier()  # every rank done with gloo before any tears it down
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", sorted(NORM_CONFIGS))
def test_synchronized_norms_and_gradients_equal_one_process(tmp_path, kind):
    """Two processes with half the batch each: running statistics and every gradient equal one
    process's on the whole batch, for Range BN, the float BN and the quantized standard BN."""
    out = tmp_path / "ddp.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "pg"), str(out), kind), nprocs=2, join=True)
    got = torch.load(out)
    want_grads, want_stats = step(make_model(kind), *batch())
    for name, value in want_stats.items():
        assert torch.allclose(got["stats"][name], value, atol=1e-6), name
    # the 16-bit output gradient, rounded over each process's own range: errors of ~2^-16 of it
    atol = 1e-4 if kind == "quantized_bn" else 1e-5
    for name, value in want_grads.items():
        assert torch.allclose(got["grads"][name], value, atol=atol), (name, float((got["grads"][name] - value).abs().max()))


def rounding_worker(rank, world, init_file, out):
    """Every process quantizes the same gradient the way the trainer seeds it (seed, rank, step)."""
    from q8.trainer import Run

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    run = Run.__new__(Run)  # only the seeding: no data, no model
    run.cfg, run.rank, run.step = type("C", (), {"seed": 0})(), rank, 7
    run.seed_step()
    g = torch.linspace(-1, 1, 20_000)
    err = q8.quantize(g, 4, rounding="stochastic") - g
    errors = [torch.empty_like(err) for _ in range(world)]
    dist.all_gather(errors, err)
    if rank == 0:
        torch.save(torch.stack(errors), out)
    dist.barrier()  # every rank done with gloo before any tears it down
    dist.destroy_process_group()


def test_every_process_draws_its_own_rounding_noise(tmp_path):
    """The same element on two processes must not round the same way: the rounding errors of
    the two ranks are uncorrelated, so the noise averages down over processes."""
    out = tmp_path / "errors.pt"
    mp.spawn(rounding_worker, args=(2, str(tmp_path / "pg"), str(out)), nprocs=2, join=True)
    errors = torch.load(out)
    corr = torch.corrcoef(errors)[0, 1].item()
    assert abs(corr) < 0.03, corr  # 20k samples: std of the estimate about 0.007
    q8.seed_rounding(0, 0, 7)
    g = torch.linspace(-1, 1, 20_000)
    assert torch.equal(errors[0], q8.quantize(g, 4, rounding="stochastic") - g)  # reproducible from (seed, rank, step)
    q8.seed_rounding(None)


@pytest.mark.parametrize("kind", sorted(NORM_CONFIGS))
def test_unsynchronized_statistics_would_differ(tmp_path, kind):
    """The comparison above can fail: per-process statistics differ from the global batch's."""
    x, y = batch()
    _, whole = step(make_model(kind), x, y)
    _, half = step(make_model(kind), x[: GLOBAL_BATCH // 2], y[: GLOBAL_BATCH // 2])
    assert not torch.allclose(whole["1.running_var"], half["1.running_var"], atol=1e-6)


def torchrun(fm, run_dir, tmp_path, *extra):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531", "train.py",
           f"data.root={fm}", "data.batch_size=32", "data.workers=0", "data.eval_batch_size=16", "data.train_subset=null",
           "++model.kwargs.width=4", "trainer.epochs=1", "trainer.progress=false", "trainer.deterministic=true",
           "norm.chunks=4", f"hydra.run.dir={run_dir}", *extra]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return env


def test_torchrun_int8_range_bn_chunks_share_one_run_folder_and_resume_exactly(tmp_path):
    """int8 with Range BN chunks on two processes; a run stopped after 2 steps and resumed
    equals the uninterrupted one (each rank's rounding stream comes from (seed, rank, step))."""
    from tests import fakedata

    fm = fakedata.fashion_mnist(tmp_path / "fm", n_train=128, n_test=50)
    run_dir = tmp_path / "run"
    env = torchrun(fm, run_dir, tmp_path)
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4  # 128 examples / global batch 32
    assert len(list((run_dir / "tb").glob("events.*"))) == 1  # only rank 0 writes
    subprocess.run([sys.executable, "evaluate.py", f"checkpoint={run_dir / 'last.pt'}"], cwd=ROOT, env=env, timeout=300, check=True)
    ev = json.loads((run_dir / "last.eval.json").read_text())
    assert ev["count"] == 50 and ev["top1"] == pytest.approx(summary["val_top1"])  # every example once

    resumed = tmp_path / "resumed"
    torchrun(fm, resumed, tmp_path, "trainer.max_steps=2")
    torchrun(fm, resumed, tmp_path)
    a, b = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (run_dir, resumed))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_torchrun_float32_baseline_with_batch_norm(tmp_path):
    """The float32 baseline (quant=fp32 norm=batch) on two CPU processes: its batch norms are
    synchronized by q8 (torch's nn.SyncBatchNorm raises on CPU, and DDP refuses it there), the
    summary counts them as float by the config, and the checkpoint loads into the plain model."""
    import json

    from tests import fakedata

    fm = fakedata.fashion_mnist(tmp_path / "fm", n_train=64, n_test=20)
    run_dir = tmp_path / "run"
    torchrun(fm, run_dir, tmp_path, "quant=fp32", "norm=batch")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2
    assert summary["coverage"]["unsupported"] == {} and summary["coverage"]["float_by_config"]["BatchNorm2d"] > 0
    state = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    from q8.models import build

    model = build("resnet20", num_classes=10, in_channels=1, width=4)
    model.load_state_dict(q8.float_state_dict(state))  # the batch norms kept their names
